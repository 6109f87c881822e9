"""Bad input gets a clear 4xx in the OpenAI error format; a schema-driven fuzz run finds no 5xx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.fuzz import fuzz_schema, load_schema
from tests.support.processes import ServiceProcess

MESSAGES = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
LONG_PROMPT = "word " * 1100  # over the test server's 1024-token context

CASES = [
    ("chat", {"messages": MESSAGES, "max_tokens": "many"}, 400, "max_tokens"),
    ("chat", {"messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
    ("chat", {"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"messages": MESSAGES, "max_tokens": 10**9}, 400, "1024"),
    ("chat", {"messages": MESSAGES, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat", {"messages": MESSAGES, "temperature": -0.5}, 400, "temperature"),
    ("chat", {"messages": MESSAGES, "top_p": 1.5}, 400, "top_p"),
    ("chat", {"messages": MESSAGES, "n": 0}, 400, "n"),
    ("chat", {"messages": MESSAGES, "stop": 7}, 400, "stop"),
    ("chat", {"messages": MESSAGES, "model": "no-such-model"}, 404, "no-such-model"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "role"),
    ("chat", {"messages": "Hi"}, 400, "messages"),
    ("chat", {}, 400, "messages"),
    ("chat", {"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "1024"),
    ("completions", {"prompt": LONG_PROMPT, "max_tokens": 4}, 400, "1024"),
    ("completions", {"prompt": "Hi", "max_tokens": 1024}, 400, "max_tokens"),
    ("completions", {"prompt": []}, 400, "prompt"),
    ("completions", {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("completions", {"prompt": [10**9]}, 400, "vocabulary"),
    ("completions", {"prompt": 12.5}, 400, "prompt"),
    ("completions", {"prompt": "Hi", "logprobs": 99}, 400, "logprobs"),
    ("completions", {"prompt": "Hi", "min_tokens": 50, "max_tokens": 5}, 400, "min_tokens"),
    ("completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "gpt-4"),
    ("completions", {"max_tokens": 5}, 400, "prompt"),
    ("chat", {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "no-such-type"}}}}, 400, "response_format"),
    ("chat", {"messages": MESSAGES, "guided_regex": "(unclosed"}, 400, "guided_regex"),
    ("chat", {"messages": MESSAGES, "guided_grammar": "root ::= missing_rule"}, 400, "guided_grammar"),
    ("chat", {"messages": MESSAGES, "guided_json": "{not json"}, 400, "guided_json"),
    ("chat", {"messages": MESSAGES, "guided_regex": "a+", "response_format": {"type": "json_object"}}, 400,
     "guided_regex"),
    ("chat", {"messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice"),
    ("chat", {"messages": MESSAGES, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     400, "tool_choice"),
    ("chat", {"messages": MESSAGES, "tools": [TOOL], "tool_choice": "required",
              "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("chat", {"messages": MESSAGES, "response_format": {"type": "json_object"}, "ignore_eos": True}, 400,
     "ignore_eos"),
    ("chat", {"messages": MESSAGES, "logit_bias": {"7": 101}}, 400, "logit_bias"),
    ("chat", {"messages": MESSAGES, "logit_bias": {"seven": 1}}, 400, "logit_bias"),
    ("completions", {"prompt": "Hi", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("completions", {"prompt": "Hi", "echo": True, "logprobs": 1}, 400, "echo"),
    ("completions", {"prompt": "Hi", "best_of": 1, "n": 2}, 400, "best_of"),
    ("completions", {"prompt": "Hi", "best_of": 3, "stream": True}, 400, "best_of"),
]
PATHS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


@pytest.mark.parametrize(("endpoint", "body", "status", "mentions"), CASES)
def test_bad_request_is_a_clear_openai_error(llm_server: ServiceProcess, endpoint: str, body: dict, status: int,
                                             mentions: str) -> None:
    response = httpx.post(llm_server.url + PATHS[endpoint], json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert mentions in error["message"] or mentions == error["param"], error


UNSUPPORTED = [
    ("chat", {"messages": MESSAGES, "functions": [{"name": "f"}]}, "functions"),
    ("chat", {"messages": MESSAGES, "best_of": 2}, "best_of"),
    ("chat", {"messages": [{"role": "user", "content": "Hi", "audio": {"id": "a1"}}]}, "messages.0.audio"),
    ("completions", {"prompt": "Hi", "suffix": "The end."}, "suffix"),
]


@pytest.mark.parametrize(("endpoint", "body", "field"), UNSUPPORTED)
def test_a_field_we_do_not_honour_is_a_400_naming_it(llm_server: ServiceProcess, endpoint: str, body: dict,
                                                     field: str) -> None:
    response = httpx.post(llm_server.url + PATHS[endpoint], json={**body, "max_tokens": 2}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and error["message"] == f"{field}: this server does not support this field"


def test_openai_client_sees_the_refused_field(llm_server: ServiceProcess) -> None:
    import openai

    client = openai.OpenAI(base_url=llm_server.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=2,
                                       functions=[{"name": "f", "parameters": {}}])
    assert refused.value.param == "functions"
    # The value that asks for nothing is still fine.
    reply = client.chat.completions.create(model=client.models.list().data[0].id, messages=MESSAGES, max_tokens=2,
                                           functions=[], response_format={"type": "text"})
    assert reply.usage.completion_tokens >= 1


def test_malformed_json_is_400(llm_server: ServiceProcess) -> None:
    response = httpx.post(llm_server.url + "/v1/chat/completions", content=b'{"messages": [',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_context_overflow_names_both_numbers(llm_server: ServiceProcess) -> None:
    response = httpx.post(llm_server.url + "/v1/completions", json={"prompt": "Hi there", "max_tokens": 1023})
    message = response.json()["error"]["message"]
    assert response.status_code == 400 and "1023" in message and "1024" in message


def test_detokenize_rejects_unknown_ids(llm_server: ServiceProcess) -> None:
    response = httpx.post(llm_server.url + "/detokenize", json={"tokens": [1, -3]})
    assert response.status_code == 400


def test_schema_fuzzing_finds_no_server_errors_and_only_clear_client_errors(llm_server: ServiceProcess) -> None:
    def short(case: Any, _: object) -> None:
        if isinstance(case.body, dict):  # keep generated requests short; every other field stays fuzzed
            case.body["max_tokens"] = 4
            if "max_completion_tokens" in case.body:  # chat's other name for it, which wins
                case.body["max_completion_tokens"] = 4

    operations, findings = fuzz_schema(load_schema(llm_server.url), llm_server.url, max_examples=12,
                                       prepare={"POST /v1/completions": short, "POST /v1/chat/completions": short})
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize"} <= \
        set(operations)
    assert not findings, findings
