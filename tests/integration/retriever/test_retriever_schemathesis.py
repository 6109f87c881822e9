"""Requests generated from the retriever's own OpenAPI schema, stateful along collections → documents → search →
delete: each drawn case goes, half the time, to live state (a collection that exists, a document id it holds), so
the fuzz reaches past "no such collection". No 5xx (503 only from the RAG routes, whose LLM is down here), every
error in the OpenAI shape. Runs on both vector stores.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import strategies as st

from tests.integration.retriever.conftest import retriever_env
from tests.support.fuzz import fuzz_schema, load_schema
from tests.support.processes import ServiceProcess

LIVE = "fuzz"
SEED_DOCUMENTS = [{"id": "plain", "text": "The pump moves water.", "metadata": {"team": "ops", "n": 1}},
                  {"id": "team/a/notes", "text": "Filters are cleaned monthly.", "metadata": {"team": "lab"}},
                  {"text": "The tank holds 40 litres.", "metadata": {"quote\"key": "x"}}]
# The order of the flow: make collections and documents, read and search them, then delete.
ORDER = ["POST /v1/collections", "POST /v1/documents", "GET /v1/collections", "GET /v1/collections/{name}",
         "GET /v1/documents", "POST /v1/search", "POST /v1/generate", "POST /v1/chat/completions",
         "DELETE /v1/documents/{document_id}", "DELETE /v1/collections/{name}"]


@pytest.fixture(scope="module")
def retriever(embed_process: ServiceProcess, vector_store: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    data = tmp_path_factory.mktemp(f"fuzz-{vector_store}")
    with ServiceProcess("retriever", env=retriever_env(data, embed_process.url, vector_store),
                        log_dir=data) as process:
        yield process.wait_ready()


def live_state(url: str) -> tuple[list[str], list[str]]:
    """Collection names, and ids of the live collection's documents, as the server has them now."""
    collections = [c["name"] for c in httpx.get(url + "/v1/collections", timeout=60).json()["collections"]]
    documents = httpx.get(url + "/v1/documents", params={"collection_name": LIVE}, timeout=60)
    ids = [d["document_id"] for d in documents.json()["documents"]] if documents.status_code == 200 else []
    return collections, ids


def prepares(url: str) -> dict[str, Any]:
    def live(data: st.DataObject) -> bool:
        return data.draw(st.booleans(), label="aim at live state")

    def body_collection(case: Any, data: st.DataObject) -> None:
        if isinstance(case.body, dict) and live(data):
            case.body["collection_name"] = LIVE

    def body_collections(case: Any, data: st.DataObject) -> None:
        if isinstance(case.body, dict) and live(data):
            case.body["collection_names"] = [LIVE]

    def query_collection(case: Any, data: st.DataObject) -> None:
        if live(data):
            case.query = {**(case.query or {}), "collection_name": LIVE}

    def path_collection(case: Any, data: st.DataObject) -> None:
        names = live_state(url)[0]
        if names and live(data):
            case.path_parameters = {"name": data.draw(st.sampled_from(names), label="collection")}

    def path_document(case: Any, data: st.DataObject) -> None:
        ids = live_state(url)[1]
        if ids and live(data):
            case.path_parameters = {"document_id": data.draw(st.sampled_from(ids), label="document")}
            case.query = {**(case.query or {}), "collection_name": LIVE}

    return {"POST /v1/documents": body_collection, "GET /v1/documents": query_collection,
            "POST /v1/search": body_collections, "POST /v1/generate": body_collections,
            "POST /v1/chat/completions": body_collections, "GET /v1/collections/{name}": path_collection,
            "DELETE /v1/documents/{document_id}": path_document, "DELETE /v1/collections/{name}": path_collection}


def test_stateful_fuzz_finds_no_server_errors_and_only_clear_client_errors(retriever: ServiceProcess) -> None:
    url = retriever.url
    assert httpx.post(url + "/v1/collections", json={"name": LIVE}, timeout=60).status_code == 200
    seeded = httpx.post(url + "/v1/documents", json={"collection_name": LIVE, "documents": SEED_DOCUMENTS},
                        timeout=120)
    assert seeded.status_code == 200, seeded.text

    operations, findings = fuzz_schema(load_schema(url), url, max_examples=25, prepare=prepares(url), order=ORDER,
                                       allow_503=frozenset({"POST /v1/generate", "POST /v1/chat/completions"}))

    assert set(ORDER) <= set(operations)
    assert not findings, findings
    assert httpx.get(url + "/v1/health/ready", timeout=30).status_code == 200
