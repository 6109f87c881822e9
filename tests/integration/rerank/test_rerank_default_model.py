"""The rerank service with no model configured: query likelihood over the bundled SmolLM2 GGUF."""

from __future__ import annotations

import math
from collections.abc import Iterator

import httpx
import pytest
from langchain_core.documents import Document
from langchain_nvidia_ai_endpoints import NVIDIARerank

from common.model_files import bundled_llm
from tests.support.processes import ServiceProcess

QUERY = "How many legs does a spider have?"
DOCUMENTS = ["The Great Wall of China stretches thousands of kilometres across northern China.",
             "Spiders are arachnids and have eight legs, unlike insects, which have six.",
             "Mount Everest is the highest mountain above sea level."]


@pytest.fixture(scope="module")
def server() -> Iterator[ServiceProcess]:
    with ServiceProcess("rerank", env={"RERANK_MODEL": "", "HF_HUB_OFFLINE": "1"}) as process:
        process.wait_ready(timeout=600)
        yield process


def test_default_is_query_likelihood_over_the_bundled_llm(server: ServiceProcess) -> None:
    card = httpx.get(server.url + "/v1/models").json()["data"][0]
    assert card["id"] == bundled_llm().name and card["scorer"] == "query_likelihood"


def test_langchain_ranks_the_relevant_document_first(server: ServiceProcess) -> None:
    reranker = NVIDIARerank(base_url=server.url + "/v1", model=bundled_llm().name, top_n=2, truncate="END")
    ranked = reranker.compress_documents(documents=[Document(page_content=d) for d in DOCUMENTS], query=QUERY)
    assert len(ranked) == 2
    assert ranked[0].page_content == DOCUMENTS[1]


def test_cohere_relevance_is_the_geometric_mean_token_probability(server: ServiceProcess) -> None:
    ranking = httpx.post(server.url + "/v1/ranking", timeout=120, json={
        "query": {"text": QUERY}, "passages": [{"text": d} for d in DOCUMENTS], "truncate": "END"}).json()
    rerank = httpx.post(server.url + "/v1/rerank", timeout=120, json={"query": QUERY, "documents": DOCUMENTS,
                                                                      "top_n": 1}).json()
    best = ranking["rankings"][0]
    assert rerank["results"][0]["index"] == best["index"] == 1
    assert rerank["results"][0]["relevance_score"] == pytest.approx(math.exp(best["logit"]), rel=1e-4)
    assert 0 < rerank["results"][0]["relevance_score"] < 1
