from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import APIError
from services.retriever.chunking import Chunker
from services.retriever.knowledge_base import KnowledgeBase, reciprocal_rank_fusion
from services.retriever.loaders import make_document
from services.retriever.store import fts_query

pytestmark = pytest.mark.anyio

FACTS = {
    "pump.txt": "The Aquaflow 300 pump must be descaled every 90 days with citric acid.",
    "boiler.txt": "The Thermax boiler shows error E42 when the water pressure drops below 0.8 bar.",
    "garden.txt": "Tomatoes need six hours of sun and deep watering twice a week.",
    "router.txt": "Reset the Netlink router by holding the recessed button for ten seconds.",
}


async def _ingest(kb: KnowledgeBase, name: str = "manuals") -> list[str]:
    if name not in [c.name for c in kb.store.collections()]:
        kb.create_collection(name)
    documents = [make_document(file, text, {"source": file, "kind": "appliance" if file != "garden.txt" else "plant"})
                 for file, text in FACTS.items()]
    outcomes = await kb.ingest(name, documents, chunk_size=512, chunk_overlap=128)
    return [o.document_id for o in outcomes]


def test_reciprocal_rank_fusion_rewards_agreement() -> None:
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1, 4]])
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)


def test_fts_query_quotes_words_so_user_text_cannot_inject_syntax() -> None:
    assert fts_query('pump AND "error" NEAR(x)') == '"pump" OR "and" OR "error" OR "near" OR "x"'
    assert fts_query("!!!") == ""


@pytest.mark.parametrize("search_type", ["dense", "sparse", "hybrid"])
async def test_each_search_type_finds_the_document_with_the_answer(knowledge_base: KnowledgeBase,
                                                                  search_type: str) -> None:
    await _ingest(knowledge_base)
    hits = await knowledge_base.search("What does error E42 on the boiler mean?", ["manuals"], top_k=3,
                                       search_type=search_type)
    assert hits[0].chunk.document_name == "boiler.txt"
    assert hits[0].chunk.metadata["source"] == "boiler.txt"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


async def test_bm25_ranks_rare_term_matches_first(knowledge_base: KnowledgeBase) -> None:
    await _ingest(knowledge_base)
    hits = await knowledge_base.search("descaled citric", ["manuals"], top_k=4, search_type="sparse")
    assert [h.chunk.document_name for h in hits] == ["pump.txt"]  # no other document holds either word


async def test_reingesting_the_same_content_is_a_no_op(knowledge_base: KnowledgeBase) -> None:
    first = await _ingest(knowledge_base)
    calls = len(knowledge_base.embedder.calls)  # type: ignore[attr-defined]
    outcomes = await knowledge_base.ingest("manuals", [make_document("copy.txt", FACTS["pump.txt"] + "  ")],
                                           chunk_size=512, chunk_overlap=128)
    assert outcomes[0].status == "unchanged" and outcomes[0].document_id == first[0]
    assert len(knowledge_base.embedder.calls) == calls  # type: ignore[attr-defined]
    assert len(knowledge_base.documents("manuals", 100, 0)) == len(FACTS)


async def test_metadata_filter_and_in_filter(knowledge_base: KnowledgeBase) -> None:
    await _ingest(knowledge_base)
    for search_type in ("dense", "sparse", "hybrid"):
        hits = await knowledge_base.search("watering pump boiler router", ["manuals"], top_k=10,
                                           search_type=search_type, metadata_filter={"kind": "plant"})
        assert {h.chunk.document_name for h in hits} == {"garden.txt"}
    hits = await knowledge_base.search("pump boiler", ["manuals"], top_k=10, search_type="dense",
                                       metadata_filter={"source": {"$in": ["pump.txt", "router.txt"]}})
    assert {h.chunk.document_name for h in hits} == {"pump.txt", "router.txt"}


async def test_multi_collection_search_and_unknown_collection(knowledge_base: KnowledgeBase) -> None:
    await _ingest(knowledge_base, "a")
    knowledge_base.create_collection("b")
    await knowledge_base.ingest("b", [make_document("fridge.txt", "The Polar fridge hums when the door is open.")],
                                chunk_size=128, chunk_overlap=0)
    hits = await knowledge_base.search("fridge door hum", ["a", "b"], top_k=2, search_type="hybrid")
    assert hits[0].chunk.collection == "b"
    with pytest.raises(APIError) as error:
        await knowledge_base.search("x", ["a", "missing"], top_k=2)
    assert error.value.status == 404 and "missing" in error.value.message


async def test_delete_removes_from_every_search(knowledge_base: KnowledgeBase) -> None:
    ids = await _ingest(knowledge_base)
    knowledge_base.delete_document("manuals", ids[1])
    for search_type in ("dense", "sparse"):
        hits = await knowledge_base.search("boiler error E42", ["manuals"], top_k=4, search_type=search_type)
        assert "boiler.txt" not in [h.chunk.document_name for h in hits]
    with pytest.raises(APIError) as error:
        knowledge_base.delete_document("manuals", ids[1])
    assert error.value.status == 404
    assert knowledge_base.integrity_problems() == []


async def test_long_document_is_chunked_with_pages_in_metadata(knowledge_base: KnowledgeBase) -> None:
    from services.retriever.loaders import Section, SourceDocument

    knowledge_base.create_collection("books")
    pages = [Section(" ".join(f"Page {p} sentence {i} about valves." for i in range(60)), {"page": p})
             for p in (1, 2)]
    document = SourceDocument("book.pdf", pages, {"source": "book.pdf"})
    (outcome,) = await knowledge_base.ingest("books", [document], chunk_size=64, chunk_overlap=16)
    assert outcome.chunks > 4
    hits = await knowledge_base.search("Page 2 sentence 30", ["books"], top_k=1, search_type="sparse")
    assert hits[0].chunk.metadata["page"] == 2 and hits[0].chunk.chunk_id.startswith(outcome.document_id + ":")


async def test_restart_loads_the_saved_index_and_rebuilds_one_that_is_behind(tmp_path: Path, chunker: Chunker,
                                                                             embedder: object) -> None:
    kb = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu")  # type: ignore[arg-type]
    ids = await _ingest(kb)
    kb.close()
    reopened = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu")  # type: ignore[arg-type]
    (collection,) = reopened.store.collections()
    saved = reopened.index_of(collection)
    assert saved.size == len(FACTS) and saved.version == collection.version
    reopened.delete_document("manuals", ids[0])  # SQLite moves on; the index file is not saved (crash)
    reopened.store.close()
    rebuilt = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu")  # type: ignore[arg-type]
    assert rebuilt.index_of(rebuilt.store.collections()[0]).size == len(FACTS) - 1
    assert rebuilt.integrity_problems() == []
    hits = await rebuilt.search("descale the pump", ["manuals"], top_k=4, search_type="dense")
    assert "pump.txt" not in [h.chunk.document_name for h in hits]
    rebuilt.close()


async def test_bad_chunking_arguments_are_refused(knowledge_base: KnowledgeBase) -> None:
    knowledge_base.create_collection("c")
    with pytest.raises(APIError) as error:
        await knowledge_base.ingest("c", [make_document("a.txt", "text")], chunk_size=64, chunk_overlap=64)
    assert error.value.status == 400
    with pytest.raises(APIError) as error:
        knowledge_base.create_collection("bad name!")
    assert error.value.status == 400
    with pytest.raises(APIError) as error:
        knowledge_base.create_collection("c")
    assert error.value.status == 409


def test_vectors_are_stored_as_float16(knowledge_base: KnowledgeBase) -> None:
    import asyncio

    asyncio.run(_ingest(knowledge_base))
    (collection,) = knowledge_base.store.collections()
    _, vectors = knowledge_base.store.all_vectors(collection.id)
    assert vectors.shape == (len(FACTS), 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)
