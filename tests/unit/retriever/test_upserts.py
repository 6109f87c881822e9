"""Upsert semantics (README "Updates"): by your own id, and by source path for files; concurrent writers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import APIError
from services.retriever.chunking import Chunker
from services.retriever.knowledge_base import KnowledgeBase
from services.retriever.loaders import load_bytes, make_document
from tests.unit.retriever.conftest import InProcessEmbedder

pytestmark = pytest.mark.anyio
SIZES = {"chunk_size": 128, "chunk_overlap": 16}


class GatedEmbedder:
    """The real in-process embedder behind a gate, so a test can line concurrent requests up deterministically."""

    def __init__(self, inner: InProcessEmbedder) -> None:
        self.inner, self.gate, self.waiting = inner, asyncio.Event(), 0

    async def embed(self, texts: list[str], input_type: str) -> np.ndarray:
        self.waiting += 1
        await self.gate.wait()
        return await self.inner.embed(texts, input_type)

    async def until_waiting(self, count: int) -> None:
        for _ in range(2000):
            if self.waiting >= count:
                return
            await asyncio.sleep(0.005)
        raise AssertionError(f"only {self.waiting} of {count} requests reached the embedder")


@pytest.fixture
def gated(tmp_path: Path, chunker: Chunker, embedder: InProcessEmbedder) -> Iterator[KnowledgeBase]:
    kb = KnowledgeBase(tmp_path / "gated", chunker, GatedEmbedder(embedder), index_backend="faiss-cpu")  # type: ignore[arg-type]
    kb.create_collection("c")
    yield kb
    kb.close()


async def _texts(kb: KnowledgeBase, query: str, search_type: str = "sparse") -> list[str]:
    return [h.chunk.content for h in (await kb.search(query, ["c"], top_k=10, search_type=search_type)).hits]


async def test_an_explicit_id_with_new_text_or_metadata_is_updated_in_place(knowledge_base: KnowledgeBase) -> None:
    knowledge_base.create_collection("c")
    first = await knowledge_base.ingest("c", [make_document("faq", "The office opens at 8 am.", {"team": "ops"},
                                                            "faq-1")], **SIZES)
    assert [o.status for o in first.documents] == ["ingested"]
    same = await knowledge_base.ingest("c", [make_document("faq", "The office opens at 8 am.", {"team": "ops"},
                                                           "faq-1")], **SIZES)
    assert [(o.status, o.chunks) for o in same.documents] == [("unchanged", 0)]
    edited = await knowledge_base.ingest("c", [make_document("faq", "The office opens at 9 am on weekdays.",
                                                             {"team": "ops"}, "faq-1")], **SIZES)
    assert [(o.document_id, o.status) for o in edited.documents] == [("faq-1", "updated")]
    for search_type in ("sparse", "dense"):
        assert await _texts(knowledge_base, "when does the office open", search_type) == [
            "The office opens at 9 am on weekdays."]
    retagged = await knowledge_base.ingest("c", [make_document("faq", "The office opens at 9 am on weekdays.",
                                                               {"team": "facilities"}, "faq-1")], **SIZES)
    assert retagged.documents[0].status == "updated"
    (listed,) = knowledge_base.documents("c", 10, 0)
    assert listed["metadata"] == {"team": "facilities"} and listed["num_chunks"] == 1
    hits = (await knowledge_base.search("office", ["c"], top_k=5, search_type="dense",
                                        metadata_filter={"team": "ops"})).hits
    assert hits == []
    assert knowledge_base.integrity_problems() == []


async def test_a_re_ingested_edited_file_replaces_its_older_version(knowledge_base: KnowledgeBase) -> None:
    knowledge_base.create_collection("c")
    old = load_bytes("notes.txt", b"The backup runs at midnight.", source="/srv/docs/notes.txt")
    first = await knowledge_base.ingest("c", old, **SIZES)
    assert first.documents[0].status == "ingested"
    new = load_bytes("notes.txt", b"The backup runs at 2 am since March.", source="/srv/docs/notes.txt")
    second = await knowledge_base.ingest("c", new, **SIZES)
    assert [o.status for o in second.documents] == ["updated"]
    assert second.replaced == [first.documents[0].document_id]
    for search_type in ("sparse", "dense"):
        assert await _texts(knowledge_base, "when does the backup run", search_type) == [
            "The backup runs at 2 am since March."]
    assert [d["document_id"] for d in knowledge_base.documents("c", 10, 0)] == [new[0].id]
    again = await knowledge_base.ingest("c", new, **SIZES)
    assert [o.status for o in again.documents] == ["unchanged"] and again.replaced == []
    assert knowledge_base.integrity_problems() == []


async def test_a_jsonl_file_that_lost_a_record_loses_it_in_the_collection(knowledge_base: KnowledgeBase) -> None:
    knowledge_base.create_collection("c")
    records = [{"text": "Alpha valve opens at 2 bar."}, {"text": "Beta valve opens at 3 bar."},
               {"text": "Gamma valve opens at 4 bar.", "id": "gamma"}]
    body = "\n".join(json.dumps(r) for r in records).encode()
    await knowledge_base.ingest("c", load_bytes("valves.jsonl", body, source="valves.jsonl"), **SIZES)
    shorter = "\n".join(json.dumps(r) for r in records[:1]).encode()
    result = await knowledge_base.ingest("c", load_bytes("valves.jsonl", shorter, source="valves.jsonl"), **SIZES)
    assert [o.status for o in result.documents] == ["unchanged"]
    assert len(result.replaced) == 2 and "gamma" in result.replaced
    assert await _texts(knowledge_base, "valve opens bar") == ["Alpha valve opens at 2 bar."]
    assert knowledge_base.integrity_problems() == []


async def test_content_shared_by_two_files_stays_while_either_holds_it(knowledge_base: KnowledgeBase) -> None:
    knowledge_base.create_collection("c")
    text = b"Badge readers reset every night."
    await knowledge_base.ingest("c", load_bytes("a.txt", text, source="a.txt"), **SIZES)
    copy = await knowledge_base.ingest("c", load_bytes("b.txt", text, source="b.txt"), **SIZES)
    assert copy.documents[0].status == "unchanged"
    edited = await knowledge_base.ingest("c", load_bytes("a.txt", b"Badge readers reset weekly.", source="a.txt"),
                                         **SIZES)
    assert edited.replaced == []  # b.txt still holds the old text
    assert sorted(await _texts(knowledge_base, "badge readers reset")) == [
        "Badge readers reset every night.", "Badge readers reset weekly."]
    json_copy = await knowledge_base.ingest("c", [make_document("api", "Badge readers reset weekly.")], **SIZES)
    assert json_copy.documents[0].status == "unchanged"
    await knowledge_base.ingest("c", load_bytes("a.txt", b"Badge readers are gone.", source="a.txt"), **SIZES)
    assert "Badge readers reset weekly." in await _texts(knowledge_base, "badge readers reset")  # the API keeps it
    assert knowledge_base.integrity_problems() == []


async def test_two_concurrent_ingests_of_one_document_ingest_it_once(gated: KnowledgeBase) -> None:
    document = make_document("doc.txt", "Concurrent uploads of the same manual.")
    first = asyncio.create_task(gated.ingest("c", [document], **SIZES))
    second = asyncio.create_task(gated.ingest("c", [document], **SIZES))
    await gated.embedder.until_waiting(2)  # type: ignore[attr-defined]
    gated.embedder.gate.set()  # type: ignore[attr-defined]
    statuses = sorted(o.status for result in await asyncio.gather(first, second) for o in result.documents)
    assert statuses == ["ingested", "unchanged"]
    assert len(gated.documents("c", 10, 0)) == 1 and gated.integrity_problems() == []


async def test_an_update_racing_an_identical_write_is_re_embedded_not_lost(gated: KnowledgeBase) -> None:
    gated.embedder.gate.set()  # type: ignore[attr-defined]
    await gated.ingest("c", [make_document("d", "Version one.", {}, "d-1")], **SIZES)
    gated.embedder.gate.clear()  # type: ignore[attr-defined]
    gated.embedder.waiting = 0  # type: ignore[attr-defined]
    update = asyncio.create_task(gated.ingest("c", [make_document("d", "Version two.", {}, "d-1")], **SIZES))
    await gated.embedder.until_waiting(1)  # type: ignore[attr-defined]
    # Meanwhile someone else writes version two; the first request finds it stored as it wanted.
    gated.embedder.gate.set()  # type: ignore[attr-defined]
    await gated.ingest("c", [make_document("d", "Version two.", {}, "d-1")], **SIZES)
    assert (await update).documents[0].status in ("updated", "unchanged")
    assert await _texts(gated, "version") == ["Version two."]


@pytest.mark.parametrize("search_type", ["dense", "hybrid"])
async def test_deleting_a_collection_during_a_search_is_a_404(gated: KnowledgeBase, search_type: str) -> None:
    gated.embedder.gate.set()  # type: ignore[attr-defined]
    await gated.ingest("c", [make_document("a.txt", "Searchable text about pumps.")], **SIZES)
    gated.embedder.gate.clear()  # type: ignore[attr-defined]
    gated.embedder.waiting = 0  # type: ignore[attr-defined]
    search = asyncio.create_task(gated.search("pumps", ["c"], top_k=3, search_type=search_type))
    await gated.embedder.until_waiting(1)  # type: ignore[attr-defined]
    await asyncio.to_thread(gated.delete_collection, "c")
    gated.embedder.gate.set()  # type: ignore[attr-defined]
    with pytest.raises(APIError) as error:
        await search
    assert error.value.status == 404 and "'c'" in error.value.message


async def test_sparse_search_of_a_collection_deleted_meanwhile_is_a_404(knowledge_base: KnowledgeBase) -> None:
    collection = knowledge_base.create_collection("c")
    await knowledge_base.ingest("c", [make_document("a.txt", "Searchable text about pumps.")], **SIZES)
    knowledge_base.delete_collection("c")  # after the search looked the collection up, before BM25 ran
    with pytest.raises(APIError) as error:
        knowledge_base._sparse([collection], "pumps", 3, {collection.id: None})
    assert error.value.status == 404


async def test_ingesting_into_a_collection_deleted_meanwhile_is_a_404(gated: KnowledgeBase) -> None:
    ingest = asyncio.create_task(gated.ingest("c", [make_document("a.txt", "Late text.")], **SIZES))
    await gated.embedder.until_waiting(1)  # type: ignore[attr-defined]
    await asyncio.to_thread(gated.delete_collection, "c")
    gated.embedder.gate.set()  # type: ignore[attr-defined]
    with pytest.raises(APIError) as error:
        await ingest
    assert error.value.status == 404
