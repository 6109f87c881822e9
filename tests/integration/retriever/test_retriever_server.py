"""The retriever as a real process on loopback, talking to a real embed process; once per vector store."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from reportlab.pdfgen import canvas

from tests.integration.retriever.conftest import ROOT, retriever_env
from tests.support.processes import ServiceProcess

MANUAL = {
    "pump.txt": "The Aquaflow 300 pump must be descaled every 90 days with citric acid.",
    "boiler.html": "<html><head><title>Thermax boiler</title><script>var e42 = 1;</script></head>"
                   "<body><p>The Thermax boiler shows error E42 when the water pressure drops below 0.8 bar.</p>"
                   "</body></html>",
}


@pytest.fixture(scope="module")
def retriever(embed_process: ServiceProcess, vector_store: str,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    data = tmp_path_factory.mktemp(f"retriever-{vector_store}")
    process = ServiceProcess("retriever", env=retriever_env(data, embed_process.url, vector_store), log_dir=data)
    process.start().wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(retriever: ServiceProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=retriever.url, timeout=60) as http:
        yield http


@pytest.fixture(scope="module")
def manuals(client: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict:
    assert client.post("/v1/collections", json={"name": "manuals"}).status_code == 200
    pdf_path = tmp_path_factory.mktemp("pdf") / "router.pdf"
    pdf = canvas.Canvas(str(pdf_path))
    pdf.drawString(72, 720, "Netlink router quick start.")
    pdf.showPage()
    pdf.drawString(72, 720, "Reset the Netlink router by holding the recessed button for ten seconds.")
    pdf.showPage()
    pdf.save()
    files = [("documents", (name, text.encode(), "text/plain")) for name, text in MANUAL.items()]
    files.append(("documents", ("router.pdf", pdf_path.read_bytes(), "application/pdf")))
    reply = client.post("/v1/documents", data={"collection_name": "manuals", "metadata": '{"team": "support"}'},
                        files=files)
    assert reply.status_code == 200, reply.text
    garden = client.post("/v1/documents", json={"collection_name": "manuals", "documents": [
        {"text": "Tomatoes need six hours of sun and deep watering twice a week.", "id": "garden-1",
         "name": "garden notes", "metadata": {"kind": "plant"}}]})
    assert garden.status_code == 200, garden.text
    return reply.json()


def test_health_reports_each_dependency(client: httpx.Client, embed_process: ServiceProcess) -> None:
    body = client.get("/v1/health/ready").json()
    assert body["ready"] is True
    embed_model = httpx.get(embed_process.url + "/v1/models").json()["data"][0]["id"]
    assert body["details"]["embed"] == {"url": embed_process.url, "ready": True, "model": embed_model}
    assert body["details"]["llm"]["ready"] is False and body["details"]["rerank"]["ready"] is False


def test_upload_reports_every_document(manuals: dict) -> None:
    assert [(d["document_name"], d["status"]) for d in manuals["documents"]] == [
        ("pump.txt", "ingested"), ("boiler.html", "ingested"), ("router.pdf", "ingested")]
    assert manuals["failed"] == []


@pytest.mark.parametrize("search_type", ["dense", "sparse", "hybrid"])
def test_search_finds_the_document_that_holds_the_answer(client: httpx.Client, manuals: dict,
                                                         search_type: str) -> None:
    reply = client.post("/v1/search", json={"query": "How do I reset the Netlink router?",
                                            "collection_names": ["manuals"], "top_k": 3, "search_type": search_type})
    assert reply.status_code == 200, reply.text
    best = reply.json()["chunks"][0]
    assert best["document_name"] == "router.pdf"
    assert best["metadata"]["page"] == 2 and best["metadata"]["team"] == "support"
    assert best["chunk_id"].startswith(best["document_id"] + ":")


def test_filter_restricts_search(client: httpx.Client, manuals: dict) -> None:
    reply = client.post("/v1/search", json={"query": "router pump boiler", "collection_names": ["manuals"],
                                            "search_type": "hybrid", "filter": {"kind": "plant"}})
    assert [c["document_name"] for c in reply.json()["chunks"]] == ["garden notes"]


def test_reupload_is_unchanged_and_documents_are_listed(client: httpx.Client, manuals: dict) -> None:
    files = [("documents", ("pump-copy.txt", MANUAL["pump.txt"].encode(), "text/plain"))]
    reply = client.post("/v1/documents", data={"collection_name": "manuals"}, files=files).json()
    assert reply["documents"][0]["status"] == "unchanged"
    listed = client.get("/v1/documents", params={"collection_name": "manuals"}).json()["documents"]
    assert sorted(d["document_name"] for d in listed) == ["boiler.html", "garden notes", "pump.txt", "router.pdf"]
    collections = client.get("/v1/collections").json()["collections"]
    assert collections[0]["name"] == "manuals" and collections[0]["documents"] == 4


def test_delete_document_then_404(client: httpx.Client, manuals: dict) -> None:
    client.post("/v1/collections", json={"name": "scratch"})
    ids = client.post("/v1/documents", json={"collection_name": "scratch", "documents": [{"text": "temporary"}]}
                      ).json()["documents"]
    path = f"/v1/documents/{ids[0]['document_id']}"
    assert client.delete(path, params={"collection_name": "scratch"}).status_code == 200
    gone = client.delete(path, params={"collection_name": "scratch"})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"
    assert client.delete("/v1/collections/scratch").status_code == 200
    assert client.get("/v1/collections/scratch").status_code == 404


@pytest.mark.parametrize(("method", "path", "body", "status", "words"), [
    ("post", "/v1/search", {"query": "x", "collection_names": ["nope"]}, 404, "nope"),
    ("post", "/v1/search", {"query": "x", "collection_names": ["manuals"], "search_type": "fuzzy"}, 400,
     "search_type"),
    ("post", "/v1/search", {"query": "x", "collection_names": ["manuals"], "filter": {"k": [1, 2]}}, 400, "$in"),
    ("post", "/v1/documents", {"collection_name": "manuals", "documents": []}, 400, "documents"),
    ("post", "/v1/documents", {"collection_name": "nope", "documents": [{"text": "a"}]}, 404, "nope"),
    ("post", "/v1/collections", {"name": "bad name"}, 400, "collection name"),
    ("post", "/v1/collections", {"name": "manuals"}, 409, "exists"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "collection_names"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}],
                                      "collection_names": ["manuals"]}, 400, "user message"),
])
def test_bad_requests_get_clear_errors(client: httpx.Client, manuals: dict, method: str, path: str, body: dict,
                                       status: int, words: str) -> None:
    reply = getattr(client, method)(path, json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_unsupported_upload_is_reported_not_hidden(client: httpx.Client, manuals: dict) -> None:
    files = [("documents", ("photo.png", b"\x89PNG", "image/png")),
             ("documents", ("ok.md", b"# Heat pump\nThe heat pump defrosts every 40 minutes.", "text/markdown"))]
    reply = client.post("/v1/documents", data={"collection_name": "manuals"}, files=files).json()
    assert reply["failed"][0]["document_name"] == "photo.png" and "unsupported" in reply["failed"][0]["error"]
    assert reply["documents"][0]["document_name"] == "ok.md"
    only_bad = client.post("/v1/documents", data={"collection_name": "manuals"}, files=files[:1])
    assert only_bad.status_code == 400 and "photo.png" in only_bad.json()["error"]["message"]


def test_llm_down_is_a_503_naming_it(client: httpx.Client, manuals: dict) -> None:
    started = time.monotonic()
    reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "reset router?"}],
                                                      "collection_names": ["manuals"]})
    assert reply.status_code == 503 and "llm" in reply.json()["error"]["message"]
    assert time.monotonic() - started < 30  # bounded retries, not a hang


def test_embed_down_is_a_503_naming_it_and_recovers(client: httpx.Client, manuals: dict,
                                                    embed_process: ServiceProcess) -> None:
    query = {"query": "router reset", "collection_names": ["manuals"], "search_type": "dense"}
    embed_process.stop()
    try:
        down = client.post("/v1/search", json=query)
        assert down.status_code == 503 and "embed" in down.json()["error"]["message"]
        sparse = client.post("/v1/search", json={**query, "search_type": "sparse"})
        assert sparse.status_code == 200 and sparse.json()["chunks"][0]["document_name"] == "router.pdf"
        assert sparse.json()["warnings"] == []
        hybrid = client.post("/v1/search", json={**query, "search_type": "hybrid"})  # degrades to BM25, says so
        assert hybrid.status_code == 200, hybrid.text
        assert hybrid.json()["chunks"][0]["document_name"] == "router.pdf"
        (warning,) = hybrid.json()["warnings"]
        assert "embed unavailable" in warning and "BM25" in warning
    finally:
        embed_process.start().wait_ready()  # same port: the retriever's URL stays valid
    up = client.post("/v1/search", json=query)
    assert up.status_code == 200 and up.json()["chunks"][0]["document_name"] == "router.pdf"


def test_metrics_and_models(client: httpx.Client, manuals: dict) -> None:
    assert "retriever_documents_ingested" in client.get("/v1/metrics").text
    assert client.get("/v1/models").json()["data"][0]["id"] == "rag-retriever"




def _ingest_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "ingest.py"), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_ingest_script_uploads_skips_unchanged_and_reports_failures(retriever: ServiceProcess,
                                                                     tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    (folder / "nested").mkdir(parents=True)
    for i in range(5):
        (folder / f"note{i}.txt").write_text(f"Maintenance note {i}: check the seal of valve {i} monthly.")
    (folder / "nested" / "faq.md").write_text("# FAQ\nThe warranty lasts 24 months.")
    (folder / "items.jsonl").write_text('{"text": "Item one."}\n{"text": "Item two.", "metadata": {"k": 1}}\n')
    (folder / "ignored.png").write_bytes(b"\x89PNG")
    common = ["--collection", "script", "--url", retriever.url, "--batch-size", "2"]

    dry = _ingest_script(str(folder), *common, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would ingest: 7 files" in dry.stdout
    assert httpx.get(retriever.url + "/v1/collections/script").status_code == 404  # dry run changed nothing

    first = _ingest_script(str(folder), *common)
    assert first.returncode == 0, first.stderr
    assert "ingested: 7 files" in first.stdout and "failed: 0" in first.stdout
    listed = httpx.get(retriever.url + "/v1/documents", params={"collection_name": "script"}).json()["documents"]
    assert len(listed) == 8  # the .jsonl holds two documents

    (folder / "note0.txt").write_text("Maintenance note 0 was revised: replace the seal yearly.")
    (folder / "broken.json").write_text("[{\"title\": \"no text\"}]")
    second = _ingest_script(str(folder), *common)
    assert second.returncode == 1
    assert "updated: 1 (replacing 1 older documents)" in second.stdout
    assert "unchanged: 6" in second.stdout and "failed: 1" in second.stdout
    assert "broken.json" in second.stderr and "item 0" in second.stderr
    listed = httpx.get(retriever.url + "/v1/documents", params={"collection_name": "script"}).json()["documents"]
    assert len(listed) == 8  # the edited note replaced its older version
    hits = httpx.post(retriever.url + "/v1/search", json={"query": "Maintenance note 0 seal", "top_k": 10,
                                                           "collection_names": ["script"], "search_type": "sparse"})
    texts = [c["content"] for c in hits.json()["chunks"]]
    assert any("revised" in t for t in texts) and not any("note 0: check" in t for t in texts)

    down = _ingest_script(str(folder), "--collection", "script", "--url", "http://127.0.0.1:9")
    assert down.returncode == 2 and "cannot reach" in down.stderr


def test_search_with_rerank_down_answers_unreranked_and_says_so(client: httpx.Client, manuals: dict) -> None:
    reply = client.post("/v1/search", json={"query": "reset the router", "collection_names": ["manuals"],
                                            "search_type": "sparse", "rerank": True, "reranker_top_k": 2})
    assert reply.status_code == 200, reply.text
    assert reply.json()["chunks"][0]["document_name"] == "router.pdf" and len(reply.json()["chunks"]) <= 2
    (warning,) = reply.json()["warnings"]
    assert "rerank unavailable" in warning and "not reranked" in warning


def test_document_ids_with_slashes_can_be_deleted(client: httpx.Client, manuals: dict) -> None:
    for document_id in ("team/a/notes", "spaces and ?query&chars"):
        added = client.post("/v1/documents", json={"collection_name": "manuals", "documents": [
            {"id": document_id, "text": f"Slash test document {document_id}."}]})
        assert added.status_code == 200 and added.json()["documents"][0]["document_id"] == document_id
        path = "/v1/documents/" + quote(document_id, safe="/")
        deleted = client.delete(path, params={"collection_name": "manuals"})
        assert deleted.status_code == 200 and deleted.json()["deleted"] == document_id, deleted.text
    encoded = client.post("/v1/documents", json={"collection_name": "manuals", "documents": [
        {"id": "x/y", "text": "Encoded slash."}]})
    assert encoded.status_code == 200
    assert client.delete("/v1/documents/x%2Fy", params={"collection_name": "manuals"}).status_code == 200


def test_an_explicit_id_with_new_text_is_updated_over_http(client: httpx.Client, manuals: dict) -> None:
    def put(text: str) -> dict:
        reply = client.post("/v1/documents", json={"collection_name": "manuals", "documents": [
            {"id": "hours", "text": text, "name": "opening hours"}]})
        assert reply.status_code == 200, reply.text
        return reply.json()["documents"][0]

    assert put("The depot opens at 7 am.")["status"] == "ingested"
    assert put("The depot opens at 7 am.")["status"] == "unchanged"
    assert put("The depot opens at 6 am from May.")["status"] == "updated"
    found = client.post("/v1/search", json={"query": "when does the depot open", "collection_names": ["manuals"],
                                            "search_type": "sparse", "top_k": 5}).json()["chunks"]
    assert [c["content"] for c in found if c["document_id"] == "hours"] == ["The depot opens at 6 am from May."]
    assert client.delete("/v1/documents/hours", params={"collection_name": "manuals"}).status_code == 200


def test_one_bad_pdf_is_reported_per_file_and_the_rest_is_ingested(client: httpx.Client, manuals: dict) -> None:
    from tests.support.bad_pdfs import aes_encrypted_pdf, decompression_bomb_pdf

    files = [("documents", ("bomb.pdf", decompression_bomb_pdf(), "application/pdf")),
             ("documents", ("locked.pdf", aes_encrypted_pdf(), "application/pdf")),
             ("documents", ("kettle.txt", b"The kettle switches off at 100 degrees.", "text/plain"))]
    reply = client.post("/v1/documents", data={"collection_name": "manuals"}, files=files)
    assert reply.status_code == 200, reply.text
    failed = {f["document_name"]: f["error"] for f in reply.json()["failed"]}
    assert set(failed) == {"bomb.pdf", "locked.pdf"}
    assert "decompression" in failed["bomb.pdf"] and "encrypted" in failed["locked.pdf"]
    assert [d["document_name"] for d in reply.json()["documents"]] == ["kettle.txt"]


def test_a_path_like_file_name_is_only_a_label(client: httpx.Client, manuals: dict, tmp_path: Path) -> None:
    files = [("documents", ("../../../../tmp/evil.txt", b"Path traversal attempt text.", "text/plain")),
             ("documents", ("..\\..\\windows\\evil2.txt", b"Backslash traversal text.", "text/plain"))]
    reply = client.post("/v1/documents", data={"collection_name": "manuals"}, files=files)
    assert reply.status_code == 200, reply.text
    assert [d["document_name"] for d in reply.json()["documents"]] == ["evil.txt", "evil2.txt"]
    assert not Path("/tmp/evil.txt").exists()
    found = client.post("/v1/search", json={"query": "traversal attempt", "collection_names": ["manuals"],
                                            "search_type": "sparse"}).json()["chunks"][0]
    assert found["metadata"]["source"] == "evil.txt" and found["metadata"]["path"] == "../../../../tmp/evil.txt"


def test_a_metadata_key_with_quotes_filters_literally(client: httpx.Client, manuals: dict) -> None:
    key = 'owner\'s "team"'
    added = client.post("/v1/documents", json={"collection_name": "manuals", "documents": [
        {"text": "Quoted key document about heaters.", "metadata": {key: "blue"}}]})
    assert added.status_code == 200
    for search_type in ("dense", "sparse", "hybrid"):
        reply = client.post("/v1/search", json={"query": "heaters", "collection_names": ["manuals"],
                                                "search_type": search_type, "filter": {key: "blue"}})
        assert reply.status_code == 200, reply.text
        assert [c["content"] for c in reply.json()["chunks"]] == ["Quoted key document about heaters."]


@pytest.mark.parametrize("name", ["docs\n", "docs\r\n", " docs", "docs/x"])
def test_a_collection_name_with_a_trailing_newline_is_refused(client: httpx.Client, name: str) -> None:
    reply = client.post("/v1/collections", json={"name": name})
    assert reply.status_code == 400 and "collection name" in reply.json()["error"]["message"]
    assert name not in [c["name"] for c in client.get("/v1/collections").json()["collections"]]


def test_query_and_filter_limits(client: httpx.Client, manuals: dict) -> None:
    words = " ".join(f"w{i}" for i in range(400_000))  # ~3 MB of distinct words
    reply = client.post("/v1/search", json={"query": words, "collection_names": ["manuals"]})
    assert reply.status_code == 413 and "8192" in reply.json()["error"]["message"]
    rag = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": words}],
                                                    "collection_names": ["manuals"]})
    assert rag.status_code == 413
    many = client.post("/v1/search", json={"query": "x", "collection_names": ["manuals"],
                                           "filter": {"k": {"$in": list(range(1025))}}})
    assert many.status_code == 400 and "1024" in many.json()["error"]["message"]
    names = client.post("/v1/search", json={"query": "x", "collection_names": [f"c{i}" for i in range(65)]})
    assert names.status_code == 400


def test_a_body_over_the_limit_is_a_413_before_it_is_read(client: httpx.Client, manuals: dict) -> None:
    big = b"x" * (16 * 1024 * 1024 + 1)
    declared = client.post("/v1/documents", data={"collection_name": "manuals"},
                           files=[("documents", ("big.txt", big, "text/plain"))])
    assert declared.status_code == 413 and declared.json()["error"]["type"] == "request_too_large"

    def chunked() -> Iterator[bytes]:
        for _ in range(17):
            yield b"y" * (1024 * 1024)

    streamed = client.post("/v1/search", content=chunked(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413
