"""kill -9 the retriever in the middle of ingestion: after a restart every acknowledged document is there,
search works, and nothing is half-written (no dangling chunks, full-text rows or index entries)."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import httpx

from common.http import ServiceClient
from common.model_files import bundled_embedding_model
from services.retriever.chunking import Chunker
from services.retriever.dependencies import EmbeddingClient
from services.retriever.knowledge_base import KnowledgeBase
from tests.integration.retriever.conftest import retriever_env
from tests.support.processes import ServiceProcess


def _batch(number: int) -> list[dict]:
    return [{"text": f"Record {number}-{i}: valve V{number * 100 + i} opens at {i + number} bar. " * 6,
             "metadata": {"batch": number}} for i in range(12)]


def _ingest_until_killed(url: str, acknowledged: list[str], stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=30) as http:
        number = 0
        while not stop.is_set():
            try:
                reply = http.post("/v1/documents", json={"collection_name": "crash", "documents": _batch(number),
                                                         "chunk_size": 24, "chunk_overlap": 4})
            except httpx.TransportError:
                return
            if reply.status_code == 200:
                acknowledged.extend(d["document_id"] for d in reply.json()["documents"])
            number += 1


def test_kill_9_during_ingest_loses_no_acknowledged_document(embed_process: ServiceProcess, tmp_path: Path) -> None:
    env = retriever_env(tmp_path / "data", embed_process.url)
    first = ServiceProcess("retriever", env=env, log_dir=tmp_path).start().wait_ready()
    assert httpx.post(first.url + "/v1/collections", json={"name": "crash"}).status_code == 200
    acknowledged: list[str] = []
    stop = threading.Event()
    writer = threading.Thread(target=_ingest_until_killed, args=(first.url, acknowledged, stop))
    writer.start()
    try:
        while len(acknowledged) < 36 and writer.is_alive():
            writer.join(0.05)
        first.stop(signal.SIGKILL)  # mid-request: the writer is always inside one
    finally:
        stop.set()
        writer.join(30)
        first.stop(signal.SIGKILL)
    assert len(acknowledged) >= 36

    second = ServiceProcess("retriever", env=env, log_dir=tmp_path).start().wait_ready()
    try:
        listed = httpx.get(second.url + "/v1/documents", params={"collection_name": "crash", "limit": 100000}).json()
        stored = {d["document_id"] for d in listed["documents"]}
        assert set(acknowledged) <= stored
        for search_type in ("dense", "sparse"):
            reply = httpx.post(second.url + "/v1/search", json={"query": "valve V103 opens", "top_k": 3,
                                                                "collection_names": ["crash"],
                                                                "search_type": search_type}, timeout=30)
            assert reply.status_code == 200
            best = reply.json()["chunks"][0]
            assert best["document_id"] in stored
            if search_type == "sparse":  # the exact token only BM25 is sure to rank first
                assert "V103" in best["content"]
    finally:
        second.stop()

    # Open the same data in-process: the start-up check must find nothing dangling anywhere.
    embedder = EmbeddingClient(ServiceClient("embed", embed_process.url))
    kb = KnowledgeBase(tmp_path / "data", Chunker.from_model_dir(bundled_embedding_model()), embedder,
                       index_backend="faiss-cpu")
    try:
        assert kb.integrity_problems() == []
    finally:
        kb.close()




def _wait_ready(url: str, want: int, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        reply = httpx.get(url + "/v1/health/ready", timeout=5)
        if reply.status_code == want or time.monotonic() > deadline:
            assert reply.status_code == want, reply.text
            return reply.json()
        time.sleep(0.1)


def test_a_failing_index_save_is_logged_turns_ready_to_503_and_is_retried(embed_process: ServiceProcess,
                                                                           tmp_path: Path) -> None:
    env = {**retriever_env(tmp_path / "data", embed_process.url), "RETRIEVER_INDEX_SNAPSHOT_CHANGES": "1",
           "RETRIEVER_INDEX_SAVE_INTERVAL": "0.2"}
    retriever = ServiceProcess("retriever", env=env, log_dir=tmp_path).start().wait_ready()
    indexes = tmp_path / "data" / "indexes"
    try:
        assert httpx.post(retriever.url + "/v1/collections", json={"name": "saves"}).status_code == 200

        def ingest(text: str) -> None:
            reply = httpx.post(retriever.url + "/v1/documents", timeout=60, json={
                "collection_name": "saves", "documents": [{"text": text}]})
            assert reply.status_code == 200, reply.text

        ingest("Saved while the disk is fine.")
        shutil.rmtree(indexes)
        indexes.write_text("a file where the index folder was: every save now fails, as on a full disk")
        ingest("Acknowledged while saves fail.")  # SQLite is the commit point: still accepted
        failing = _wait_ready(retriever.url, 503)
        assert "saving vector indexes failed" in failing["message"]
        assert "saving vector indexes failed" in retriever.logs()
        hits = httpx.post(retriever.url + "/v1/search", json={"query": "acknowledged saves", "top_k": 1,
                                                              "collection_names": ["saves"], "search_type": "dense"})
        assert hits.json()["chunks"][0]["content"] == "Acknowledged while saves fail."
        indexes.unlink()
        indexes.mkdir()
        assert _wait_ready(retriever.url, 200)["ready"] is True  # the retry succeeded on its own
        assert (indexes / "1.rvix").exists()
        assert "saving vector indexes works again" in retriever.logs()
    finally:
        retriever.stop()
