"""The OpenAI request schemas on their own: a field we do not implement is refused by name, never ignored; the
structured-output and tool fields we do implement are parsed, and malformed ones refused."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.schemas.openai import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(("extra", "field"), [
    ({"functions": [{"name": "weather"}]}, "functions"),
    ({"function_call": {"name": "weather"}}, "function_call"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"made_up_knob": 1}, "made_up_knob"),
])
def test_chat_field_we_do_not_honour_is_refused_by_name(extra: dict, field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({"messages": MESSAGES, **extra})
    [error] = refused.value.errors()
    assert error["type"] == "extra_forbidden" and error["loc"] == (field,)


def test_message_fields_we_do_not_honour_are_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi", "audio": {"id": "a"}}]})
    assert refused.value.errors()[0]["loc"] == ("messages", 0, "audio")


def test_tool_history_and_structured_fields_are_parsed() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    request = ChatCompletionRequest.model_validate({
        "messages": [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
        "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "weather"}},
        "parallel_tool_calls": False, "logit_bias": {"42": -100},
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"},
                                                                   "strict": True}}})
    assert request.messages[1].tool_calls[0].function.name == "weather"
    assert request.messages[2].tool_call_id == "c1"
    assert request.response_format.json_schema.json_schema == {"type": "object"}
    assert request.tool_choice.function.name == "weather"


@pytest.mark.parametrize(("extra", "field"), [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"guided_choice": []}, "guided_choice"),
    ({"structured_outputs": {"json": {}, "unknown": 1}}, "structured_outputs"),
])
def test_malformed_structured_fields_are_refused(extra: dict, field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({"messages": MESSAGES, **extra})
    assert refused.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize(("extra", "field"), [({"suffix": "The end."}, "suffix")])
def test_completion_field_we_do_not_honour_is_refused_by_name(extra: dict, field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        CompletionRequest.model_validate({"prompt": "Hi", **extra})
    assert refused.value.errors()[0]["loc"] == (field,)


def test_values_that_ask_for_nothing_are_accepted() -> None:
    neutral = {"functions": None, "function_call": "auto", "best_of": 1, "store": False, "seed": None,
               "user": "u-1"}
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi"}], **neutral})
    assert request.messages[0].text == "Hi" and request.seed is None and request.user == "u-1"
    assert CompletionRequest.model_validate({"prompt": "Hi", "best_of": 1, "suffix": None}).prompts == ["Hi"]
