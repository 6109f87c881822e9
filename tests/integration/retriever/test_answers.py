"""RAG answers through real embed and LLM processes: citations, streaming, the context budget, prefix reuse."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.retriever.conftest import retriever_env
from tests.support.inprocess import serve_in_thread
from tests.support.plain_openai_proxy import HOLD, plain_openai_proxy
from tests.support.processes import ServiceProcess

CONTEXT = 1024  # a small LLM context, so that fitting sources into it is exercised
FILLER = [f"Warehouse shelf {i} stores {i * 7} boxes of spare gaskets, sorted by size and colour code {i}."
          for i in range(40)]


@pytest.fixture(scope="module")
def llm_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    from tests.integration.retriever.conftest import _require

    _require("llm")
    process = ServiceProcess("llm", env={"HF_HUB_OFFLINE": "1", "LLM_MAX_MODEL_LEN": str(CONTEXT)},
                             log_dir=tmp_path_factory.mktemp("llm"))
    process.start().wait_ready(300)
    yield process
    process.stop()


def _retriever_with_kb(env: dict[str, str], data: Path) -> Iterator[httpx.Client]:
    with ServiceProcess("retriever", env=env, log_dir=data) as retriever:
        retriever.wait_ready()
        with httpx.Client(base_url=retriever.url, timeout=120) as http:
            http.post("/v1/collections", json={"name": "kb"})
            documents = [{"text": "The Aquaflow 300 pump must be descaled every 90 days.",
                          "name": "pump.txt"}] + [{"text": t, "name": f"shelf{i}.txt"} for i, t in enumerate(FILLER)]
            assert http.post("/v1/documents", json={"collection_name": "kb", "documents": documents}).status_code == 200
            yield http


@pytest.fixture(scope="module")
def client(embed_process: ServiceProcess, llm_process: ServiceProcess, vector_store: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    data = tmp_path_factory.mktemp(f"retriever-{vector_store}")
    # no score cut-off: these tests count how many sources the context and the source budget let in
    env = {**retriever_env(data, embed_process.url, vector_store), "RETRIEVER_LLM_URL": llm_process.url,
           "RETRIEVER_RAG_MIN_SCORE_RATIO": "0"}
    yield from _retriever_with_kb(env, data)


@pytest.fixture(scope="module")
def plain_llm(llm_process: ServiceProcess) -> Iterator[str]:
    """Our LLM as a plain OpenAI endpoint: no /tokenize, no max_model_len; holds questions marked HOLD."""
    with serve_in_thread(plain_openai_proxy(llm_process.url)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def plain_llm_client(embed_process: ServiceProcess, plain_llm: str,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    data = tmp_path_factory.mktemp("retriever-plain")
    env = {**retriever_env(data, embed_process.url), "RETRIEVER_LLM_URL": plain_llm,
           "RETRIEVER_LLM_CONTEXT_LENGTH": str(CONTEXT)}
    yield from _retriever_with_kb(env, data)


def _ask(question: str, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": question}], "collection_names": ["kb"], "temperature": 0,
            "max_tokens": 32, **extra}


def test_answer_states_the_fact_and_cites_its_document(client: httpx.Client) -> None:
    reply = client.post("/v1/chat/completions", json=_ask("How often must the Aquaflow 300 pump be descaled?"))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert "90" in body["choices"][0]["message"]["content"]
    citations = body["citations"]
    assert citations["results"][0]["document_name"] == "pump.txt"
    assert citations["total_results"] == len(citations["results"])
    assert body["usage"]["prompt_tokens"] > 0 and "cached_tokens" in body["usage"]["prompt_tokens_details"]


def test_structured_answer_with_citations(client: httpx.Client) -> None:
    """`response_format` goes through to the LLM: the answer follows the schema, the citations come alongside."""
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 120},
                                               "sources": {"type": "array", "maxItems": 3,
                                                           "items": {"type": "integer", "minimum": 1, "maximum": 9}}},
              "required": ["answer", "sources"], "additionalProperties": False}
    reply = client.post("/v1/chat/completions", json=_ask(
        "How often must the Aquaflow 300 pump be descaled?", max_tokens=120,
        response_format={"type": "json_schema", "json_schema": {"name": "cited_answer", "schema": schema}}))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    answer = json.loads(body["choices"][0]["message"]["content"])
    assert set(answer) == {"answer", "sources"} and isinstance(answer["answer"], str)
    assert all(1 <= n <= 9 for n in answer["sources"]) and len(answer["sources"]) <= 3
    assert body["citations"]["results"][0]["document_name"] == "pump.txt"


def test_streaming_sends_citations_first_and_ends_with_done(client: httpx.Client) -> None:
    events = []
    with client.stream("POST", "/v1/generate", json=_ask("How often must the Aquaflow 300 pump be descaled?",
                                                         stream=True)) as reply:
        assert reply.status_code == 200
        lines = [line for line in reply.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[5:]) for line in lines[:-1]]
    assert events[0]["citations"]["results"][0]["document_name"] == "pump.txt"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert "90" in text
    assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_sources_fill_the_context_but_never_overflow_it(client: httpx.Client) -> None:
    # 41 candidates of ~25 tokens do not all fit 1024 - 600 tokens (less than the small model's source budget, so
    # the context is what stops them); the LLM would answer 400 if they overflowed.
    reply = client.post("/v1/chat/completions", json=_ask("Which shelf stores gaskets?", vdb_top_k=41,
                                                          reranker_top_k=41, max_tokens=600, search_type="sparse",
                                                          stop=["\n"]))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    used = body["citations"]["total_results"]
    assert 5 < used < 41
    assert body["usage"]["prompt_tokens"] + 600 <= CONTEXT


def test_a_small_llm_gets_the_source_tokens_it_reads_well_not_all_that_fit(client: httpx.Client) -> None:
    # The 135M model's card says its size; the retriever then gives it at most 384 tokens of sources, though the
    # 1024-token context has room for about 900 here.
    reply = client.post("/v1/chat/completions", json=_ask("Which shelf stores gaskets?", vdb_top_k=41,
                                                          reranker_top_k=41, search_type="sparse", stop=["\n"]))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert 5 < body["citations"]["total_results"] < 41
    assert body["usage"]["prompt_tokens"] + 32 < CONTEXT - 100


def test_the_shared_prompt_prefix_is_reused_across_questions(client: httpx.Client) -> None:
    client.post("/v1/chat/completions", json=_ask("Which shelf stores 70 boxes?"))
    second = client.post("/v1/chat/completions", json=_ask("Where are the gaskets for shelf 3?")).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_earlier_turns_are_kept_and_knowledge_base_can_be_skipped(client: httpx.Client) -> None:
    earlier = [{"role": "user", "content": "I maintain the Aquaflow pumps in building C."},
               {"role": "assistant", "content": "Understood, building C pumps."}]
    question = {"role": "user", "content": "How often must the Aquaflow 300 pump be descaled?"}
    alone = client.post("/v1/chat/completions", json={**_ask(""), "messages": [question], "max_tokens": 4}).json()
    with_turns = client.post("/v1/chat/completions", json={**_ask(""), "messages": [*earlier, question],
                                                           "max_tokens": 4}).json()
    # Same question, same sources: the extra prompt tokens are the earlier turns, kept in the prompt.
    assert with_turns["usage"]["prompt_tokens"] > alone["usage"]["prompt_tokens"] + 15
    assert with_turns["citations"]["results"] == alone["citations"]["results"]
    skipped = client.post("/v1/chat/completions", json={"messages": [question], "use_knowledge_base": False,
                                                        "temperature": 0, "max_tokens": 4})
    assert skipped.status_code == 200 and "citations" not in skipped.json()
    assert skipped.json()["usage"]["prompt_tokens"] < alone["usage"]["prompt_tokens"]


def test_a_question_too_long_for_the_context_is_a_400_with_numbers(client: httpx.Client) -> None:
    reply = client.post("/v1/chat/completions", json=_ask("why " * 900, max_tokens=200))
    assert reply.status_code == 400
    assert str(CONTEXT) in reply.json()["error"]["message"]


def test_rerank_down_answers_unreranked_and_says_so(client: httpx.Client) -> None:
    reply = client.post("/v1/chat/completions", json=_ask("How often must the Aquaflow 300 pump be descaled?",
                                                          enable_reranker=True, search_type="sparse"))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["citations"]["results"][0]["document_name"] == "pump.txt"
    (warning,) = body["warnings"]
    assert "rerank unavailable" in warning and "not reranked" in warning
    with client.stream("POST", "/v1/generate", json=_ask("How often must the Aquaflow 300 pump be descaled?",
                                                         enable_reranker=True, stream=True)) as streamed:
        first = json.loads(next(line for line in streamed.iter_lines() if line.startswith("data:"))[5:])
    assert first["warnings"] == [warning]


def test_an_llm_without_tokenize_still_answers_within_its_context(plain_llm_client: httpx.Client) -> None:
    reply = plain_llm_client.post("/v1/chat/completions", json=_ask(
        "How often must the Aquaflow 300 pump be descaled?"))
    assert reply.status_code == 200, reply.text
    assert "90" in reply.json()["choices"][0]["message"]["content"]
    assert reply.json()["citations"]["results"][0]["document_name"] == "pump.txt"
    full = plain_llm_client.post("/v1/chat/completions", json=_ask("Which shelf stores gaskets?", vdb_top_k=41,
                                                                   reranker_top_k=41, max_tokens=300,
                                                                   search_type="sparse", stop=["\n"]))
    assert full.status_code == 200, full.text  # estimated counts kept prompt + answer inside the context
    body = full.json()
    assert 3 < body["citations"]["total_results"] < 41
    assert body["usage"]["prompt_tokens"] + 300 <= CONTEXT


def test_a_hung_llm_ends_at_the_rag_deadline_with_a_503(embed_process: ServiceProcess, plain_llm: str,
                                                       tmp_path: Path) -> None:
    env = {**retriever_env(tmp_path, embed_process.url), "RETRIEVER_LLM_URL": plain_llm,
           "RETRIEVER_RAG_TIMEOUT": "3"}
    with ServiceProcess("retriever", env=env, log_dir=tmp_path) as retriever:
        retriever.wait_ready()
        ask = {"messages": [{"role": "user", "content": f"{HOLD}: how often is the pump descaled?"}],
               "use_knowledge_base": False, "max_tokens": 8}
        reply = httpx.post(retriever.url + "/v1/chat/completions", json=ask, timeout=120)
        assert reply.status_code == 503, reply.text
        error = reply.json()["error"]
        assert "deadline of 3s" in error["message"] and error["code"] == "deadline_exceeded"
        streamed = httpx.post(retriever.url + "/v1/chat/completions", json={**ask, "stream": True}, timeout=120)
        assert streamed.status_code == 503 and "deadline" in streamed.json()["error"]["message"]
