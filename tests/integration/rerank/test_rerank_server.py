"""The rerank service as a real process on loopback, serving a tiny random-weight cross-encoder."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from langchain_core.documents import Document
from langchain_nvidia_ai_endpoints import NVIDIARerank
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.support.fuzz import fuzz_schema, load_schema
from tests.support.processes import ServiceProcess
from tests.unit.rerank.tiny_rerank_models import build_cross_encoder

MAX_PASSAGES = 40
QUERY = "what is the capital of france"
PASSAGES = ["paris is the capital of france", "the cat sat on the mat", "water boils at 100 degrees",
            "the river bank is cold in winter", "python is a language", "stars and the moon", "dogs and cats"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cross_encoder(tmp_path_factory.mktemp("cross-encoder"), num_labels=1)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServiceProcess]:
    env = {"RERANK_MODEL": str(model_dir), "RERANK_MAX_PASSAGES": str(MAX_PASSAGES), "HF_HUB_OFFLINE": "1",
           "RERANK_MAX_BATCH_SIZE": "16"}
    with ServiceProcess("rerank", env=env) as process:
        process.wait_ready()
        yield process


def direct_logits(model_dir: Path, query: str, passages: list[str]) -> list[float]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [model(**tokenizer(query, p, return_tensors="pt")).logits[0, 0].item() for p in passages]


def test_models_and_readiness(server: ServiceProcess, model_dir: Path) -> None:
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list"
    assert [card["id"] for card in models["data"]] == [model_dir.name]
    assert models["data"][0]["scorer"] == "cross_encoder"
    assert httpx.get(server.url + "/v1/health/ready").json()["ready"] is True


def test_ranking_returns_the_model_logits_best_first(server: ServiceProcess, model_dir: Path) -> None:
    response = httpx.post(server.url + "/v1/ranking", json={
        "model": model_dir.name, "query": {"text": QUERY}, "passages": [{"text": p} for p in PASSAGES],
        "truncate": "NONE"})
    assert response.status_code == 200, response.text
    rankings = response.json()["rankings"]
    assert sorted(r["index"] for r in rankings) == list(range(len(PASSAGES)))
    logits = [r["logit"] for r in rankings]
    assert logits == sorted(logits, reverse=True)
    expected = direct_logits(model_dir, QUERY, PASSAGES)
    for ranking in rankings:
        assert ranking["logit"] == pytest.approx(expected[ranking["index"]], abs=1e-5)


def test_rerank_route_top_n_and_documents(server: ServiceProcess, model_dir: Path) -> None:
    documents: list = [PASSAGES[0], {"text": PASSAGES[1]}, *PASSAGES[2:]]
    body = httpx.post(server.url + "/v1/rerank", json={
        "query": QUERY, "documents": documents, "top_n": 3, "return_documents": True}).json()
    assert body["object"] == "rerank" and body["model"] == model_dir.name
    assert body["usage"]["total_tokens"] > len(PASSAGES) * 3
    expected = direct_logits(model_dir, QUERY, PASSAGES)
    best = sorted(range(len(PASSAGES)), key=lambda i: -expected[i])[:3]
    assert [r["index"] for r in body["results"]] == best
    for result in body["results"]:
        assert result["document"] == {"text": PASSAGES[result["index"]]}
        assert result["relevance_score"] == pytest.approx(1 / (1 + math.exp(-expected[result["index"]])), abs=1e-5)
    plain = httpx.post(server.url + "/v1/rerank", json={"model": model_dir.name, "query": QUERY,
                                                         "documents": PASSAGES}).json()
    assert len(plain["results"]) == len(PASSAGES)
    assert all("document" not in result for result in plain["results"])


def test_langchain_nvidia_rerank_works_unchanged(server: ServiceProcess, model_dir: Path) -> None:
    reranker = NVIDIARerank(base_url=server.url + "/v1", model=model_dir.name, top_n=3, truncate="END")
    documents = [Document(page_content=p, metadata={"n": i}) for i, p in enumerate(PASSAGES)]
    compressed = reranker.compress_documents(documents=documents, query=QUERY)
    expected = direct_logits(model_dir, QUERY, PASSAGES)
    best = sorted(range(len(PASSAGES)), key=lambda i: -expected[i])[:3]
    assert [doc.metadata["n"] for doc in compressed] == best
    assert [doc.metadata["relevance_score"] for doc in compressed] == pytest.approx([expected[i] for i in best],
                                                                                     abs=1e-5)


def test_concurrent_requests_keep_their_own_indices_and_scores(server: ServiceProcess) -> None:
    requests = [{"query": {"text": f"{QUERY} {'cat ' * (n % 5)}"},
                 "passages": [{"text": PASSAGES[(n + k) % len(PASSAGES)] + " dog" * k} for k in range(1 + n % 7)]}
                for n in range(32)]

    async def post_all() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            responses = await asyncio.gather(*(client.post("/v1/ranking", json=r) for r in requests))
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        return [r.json() for r in responses]

    together = asyncio.run(post_all())
    for request, concurrent in zip(requests, together, strict=True):
        alone = httpx.post(server.url + "/v1/ranking", json=request).json()
        by_index = {r["index"]: r["logit"] for r in concurrent["rankings"]}
        assert sorted(by_index) == list(range(len(request["passages"])))
        # padding in a shared batch moves scores by float noise, so near-ties may swap: compare by index
        assert [by_index[r["index"]] for r in alone["rankings"]] == pytest.approx(
            [r["logit"] for r in alone["rankings"]], abs=1e-4)
        logits = [r["logit"] for r in concurrent["rankings"]]
        assert logits == sorted(logits, reverse=True)
    metrics = httpx.get(server.url + "/v1/metrics").text
    assert "rerank_batch_size_count" in metrics and "rerank_passages_total" in metrics


LONG = " ".join(["the cat sat on the mat"] * 40)


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"query": {"text": QUERY}, "passages": []}, 400, "passages"),
    ({"passages": [{"text": "a"}]}, 400, "query"),
    ({"query": {"text": QUERY}, "passages": "not a list"}, 400, "passages"),
    ({"query": {"text": 42}, "passages": [{"text": "a"}]}, 400, "query"),
    ({"query": {"text": QUERY}, "passages": [{"text": "a"}], "truncate": "START"}, 400, "truncate"),
    ({"query": {"text": QUERY}, "passages": [{"text": "a"}] * (MAX_PASSAGES + 1)}, 413, str(MAX_PASSAGES)),
    ({"query": {"text": QUERY}, "passages": [{"text": "a"}, {"text": LONG}], "truncate": "NONE"}, 400, "limit of 64"),
    ({"model": "no-such-model", "query": {"text": QUERY}, "passages": [{"text": "a"}]}, 404, "no-such-model"),
])
def test_bad_ranking_requests_get_openai_errors(server: ServiceProcess, body: dict, status: int, needle: str) -> None:
    response = httpx.post(server.url + "/v1/ranking", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle in error["message"] or needle == error["param"], error
    assert set(error) == {"message", "type", "param", "code"}


def test_long_passage_is_cut_with_truncate_end(server: ServiceProcess) -> None:
    response = httpx.post(server.url + "/v1/ranking", json={
        "query": {"text": QUERY}, "passages": [{"text": "a"}, {"text": LONG}], "truncate": "END"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(("body", "status"), [
    ({"query": QUERY, "documents": []}, 400),
    ({"documents": ["a"]}, 400),
    ({"query": QUERY, "documents": [1, 2]}, 400),
    ({"query": QUERY, "documents": ["a"], "top_n": 0}, 400),
    ({"query": QUERY, "documents": ["a"], "model": "other"}, 404),
])
def test_bad_rerank_requests_get_openai_errors(server: ServiceProcess, body: dict, status: int) -> None:
    response = httpx.post(server.url + "/v1/rerank", json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"]


def test_malformed_json_is_400(server: ServiceProcess) -> None:
    response = httpx.post(server.url + "/v1/ranking", content=b'{"query": {"text": ',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_schema_fuzzing_finds_no_server_errors_and_only_clear_client_errors(server: ServiceProcess) -> None:
    operations, findings = fuzz_schema(load_schema(server.url), server.url, max_examples=30)
    assert {"POST /v1/ranking", "POST /v1/rerank", "GET /v1/models"} <= set(operations)
    assert not findings, findings


def test_a_model_that_fails_to_load_leaves_the_service_unready(tmp_path: Path) -> None:
    env = {"RERANK_MODEL": str(tmp_path / "missing-model"), "HF_HUB_OFFLINE": "1"}
    with ServiceProcess("rerank", env=env) as process:
        process.wait_live()
        for _ in range(300):
            ready = httpx.get(process.url + "/v1/health/ready")
            if "failed" in ready.json()["message"]:
                break
            time.sleep(0.1)
        assert ready.status_code == 503 and "failed to load" in ready.json()["message"]
        response = httpx.post(process.url + "/v1/ranking", json={"query": {"text": "q"}, "passages": [{"text": "p"}]})
        assert response.status_code == 503
        assert response.json()["error"]["type"] == "service_unavailable"
