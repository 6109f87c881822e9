from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.errors import APIError
from services.retriever.chunking import Chunker
from services.retriever.knowledge_base import Hit, KnowledgeBase, reciprocal_rank_fusion
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
    if name not in [c.name for c in kb.vectors.collections()]:
        kb.create_collection(name)
    documents = [make_document(file, text, {"source": file, "kind": "appliance" if file != "garden.txt" else "plant"})
                 for file, text in FACTS.items()]
    result = await kb.ingest(name, documents, chunk_size=512, chunk_overlap=128)
    return [o.document_id for o in result.documents]


async def _hits(kb: KnowledgeBase, query: str, collections: list[str], **options: object) -> list[Hit]:
    return (await kb.search(query, collections, **options)).hits  # type: ignore[arg-type]


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
    hits = await _hits(knowledge_base, "What does error E42 on the boiler mean?", ["manuals"], top_k=3,
                                       search_type=search_type)
    assert hits[0].chunk.document_name == "boiler.txt"
    assert hits[0].chunk.metadata["source"] == "boiler.txt"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


async def test_bm25_ranks_rare_term_matches_first(knowledge_base: KnowledgeBase) -> None:
    await _ingest(knowledge_base)
    hits = await _hits(knowledge_base, "descaled citric", ["manuals"], top_k=4, search_type="sparse")
    assert [h.chunk.document_name for h in hits] == ["pump.txt"]  # no other document holds either word


async def test_reingesting_the_same_content_is_a_no_op(knowledge_base: KnowledgeBase) -> None:
    first = await _ingest(knowledge_base)
    calls = len(knowledge_base.embedder.calls)  # type: ignore[attr-defined]
    result = await knowledge_base.ingest("manuals", [make_document("copy.txt", FACTS["pump.txt"] + "  ")],
                                         chunk_size=512, chunk_overlap=128)
    outcomes = result.documents
    assert outcomes[0].status == "unchanged" and outcomes[0].document_id == first[0]
    assert len(knowledge_base.embedder.calls) == calls  # type: ignore[attr-defined]
    assert len(knowledge_base.documents("manuals", 100, 0)) == len(FACTS)


async def test_metadata_filter_and_in_filter(knowledge_base: KnowledgeBase) -> None:
    await _ingest(knowledge_base)
    for search_type in ("dense", "sparse", "hybrid"):
        hits = await _hits(knowledge_base, "watering pump boiler router", ["manuals"], top_k=10,
                                           search_type=search_type, metadata_filter={"kind": "plant"})
        assert {h.chunk.document_name for h in hits} == {"garden.txt"}
    hits = await _hits(knowledge_base, "pump boiler", ["manuals"], top_k=10, search_type="dense",
                                       metadata_filter={"source": {"$in": ["pump.txt", "router.txt"]}})
    assert {h.chunk.document_name for h in hits} == {"pump.txt", "router.txt"}


async def test_multi_collection_search_and_unknown_collection(knowledge_base: KnowledgeBase) -> None:
    await _ingest(knowledge_base, "a")
    knowledge_base.create_collection("b")
    await knowledge_base.ingest("b", [make_document("fridge.txt", "The Polar fridge hums when the door is open.")],
                                chunk_size=128, chunk_overlap=0)
    hits = await _hits(knowledge_base, "fridge door hum", ["a", "b"], top_k=2, search_type="hybrid")
    assert hits[0].chunk.collection == "b"
    with pytest.raises(APIError) as error:
        await _hits(knowledge_base, "x", ["a", "missing"], top_k=2)
    assert error.value.status == 404 and "missing" in error.value.message


async def test_delete_removes_from_every_search(knowledge_base: KnowledgeBase) -> None:
    ids = await _ingest(knowledge_base)
    knowledge_base.delete_document("manuals", ids[1])
    for search_type in ("dense", "sparse"):
        hits = await _hits(knowledge_base, "boiler error E42", ["manuals"], top_k=4, search_type=search_type)
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
    (outcome,) = (await knowledge_base.ingest("books", [document], chunk_size=64, chunk_overlap=16)).documents
    assert outcome.chunks > 4
    hits = await _hits(knowledge_base, "Page 2 sentence 30", ["books"], top_k=1, search_type="sparse")
    assert hits[0].chunk.metadata["page"] == 2 and hits[0].chunk.chunk_id.startswith(outcome.document_id + ":")


async def test_restart_loads_the_saved_index_and_rebuilds_one_that_is_behind(tmp_path: Path, chunker: Chunker,
                                                                             embedder: object) -> None:
    kb = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu")  # type: ignore[arg-type]
    ids = await _ingest(kb)
    kb.close()
    reopened = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu")  # type: ignore[arg-type]
    (collection,) = reopened.vectors.store.collections()
    saved = reopened.vectors.index_of(collection)
    assert saved.size == len(FACTS) and saved.version == collection.version
    reopened.delete_document("manuals", ids[0])  # SQLite moves on; the index file is not saved (crash)
    reopened.vectors.store.close()
    rebuilt = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu")  # type: ignore[arg-type]
    assert rebuilt.vectors.index_of(rebuilt.vectors.store.collections()[0]).size == len(FACTS) - 1
    assert rebuilt.integrity_problems() == []
    hits = await _hits(rebuilt, "descale the pump", ["manuals"], top_k=4, search_type="dense")
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
    (collection,) = knowledge_base.vectors.store.collections()
    _, vectors = knowledge_base.vectors.store.all_vectors(collection.id)
    assert vectors.shape == (len(FACTS), 384) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-2)


async def test_metadata_keys_with_quotes_and_dots_are_matched_literally(knowledge_base: KnowledgeBase) -> None:
    knowledge_base.create_collection("c")
    keys = ['it\'s', 'say "hi"', "a.b", "$[0]"]
    await knowledge_base.ingest("c", [make_document(f"{n}.txt", f"Document number {n} about gaskets.", {key: n})
                                      for n, key in enumerate(keys)], chunk_size=64, chunk_overlap=0)
    for n, key in enumerate(keys):
        for search_type in ("dense", "sparse"):
            hits = await _hits(knowledge_base, "gaskets", ["c"], top_k=10, search_type=search_type,
                               metadata_filter={key: n})
            assert [h.chunk.metadata[key] for h in hits] == [n], (key, search_type)


async def test_filters_are_index_lookups_and_typed_like_json(knowledge_base: KnowledgeBase) -> None:
    knowledge_base.create_collection("c")
    values: list[object] = [True, 1, "1", 2.5, None, ["x", "y"], {"k": 1}]
    await knowledge_base.ingest("c", [make_document(f"{n}.txt", f"Entry {n} on valves.", {"v": value, "n": n})
                                      for n, value in enumerate(values)], chunk_size=64, chunk_overlap=0)

    async def matching(condition: object) -> list[int]:
        hits = await _hits(knowledge_base, "valves", ["c"], top_k=10, search_type="sparse",
                           metadata_filter={"v": condition})
        return sorted(int(h.chunk.metadata["n"]) for h in hits)

    assert await matching("1") == [2]
    assert await matching(2.5) == [3]
    assert await matching({"$in": [["x", "y"]]}) == [5]
    assert await matching({"$in": [{"k": 1}]}) == [6]
    assert await matching(True) == [0, 1]  # JSON true is stored as 1, as SQLite's JSON functions do
    assert await matching({"$in": ["1", 2.5]}) == [2, 3]
    assert await matching(None) == []  # as in SQL, null matches nothing
    assert await matching(10**30) == [] and await matching(-(10**30)) == []  # past int64: no overflow, no match
    (collection,) = knowledge_base.vectors.store.collections()
    plan = " ".join(str(tuple(r)) for r in knowledge_base.vectors.store._db.execute(
        "EXPLAIN QUERY PLAN SELECT chunk_id FROM chunk_metadata WHERE collection_id = ? AND key = ? AND value IN (?)",
        (collection.id, "v", "1")))
    assert "metadata_by_value" in plan


def test_a_database_from_before_upserts_and_filter_index_is_migrated(tmp_path: Path, chunker: Chunker,
                                                                      embedder: object) -> None:
    import asyncio
    import sqlite3

    kb = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu")  # type: ignore[arg-type]
    asyncio.run(_ingest(kb))
    kb.close()
    with sqlite3.connect(tmp_path / "retriever.sqlite3") as db:  # what the previous version wrote
        db.executescript("DROP TABLE chunk_metadata; DROP TABLE document_sources; "
                         "ALTER TABLE documents DROP COLUMN fingerprint; PRAGMA user_version = 0;")
    migrated = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu")  # type: ignore[arg-type]
    try:
        hits = asyncio.run(_hits(migrated, "watering", ["manuals"], top_k=5, search_type="sparse",
                                 metadata_filter={"kind": "plant"}))
        assert [h.chunk.document_name for h in hits] == ["garden.txt"]
        assert migrated.integrity_problems() == []
    finally:
        migrated.close()


async def test_a_query_over_the_length_limit_is_a_413(tmp_path: Path, chunker: Chunker, embedder: object) -> None:
    kb = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu", max_query_chars=100)  # type: ignore[arg-type]
    try:
        kb.create_collection("c")
        with pytest.raises(APIError) as error:
            await kb.search("x" * 101, ["c"], top_k=3)
        assert error.value.status == 413 and "100" in error.value.message
        assert (await kb.search("x" * 100, ["c"], top_k=3, search_type="sparse")).hits == []
    finally:
        kb.close()


def test_bm25_matches_at_most_the_first_64_distinct_words() -> None:
    query = fts_query(" ".join(f"w{i} w{i}" for i in range(100_000)))
    assert query.count(" OR ") == 63 and query.endswith('"w63"')


@pytest.mark.parametrize("name", ["docs\n", "docs\r\n", "\ndocs", "docs/../x", "dócs", "a" * 129, ".hidden"])
def test_collection_names_must_match_whole(knowledge_base: KnowledgeBase, name: str) -> None:
    with pytest.raises(APIError) as error:
        knowledge_base.create_collection(name)
    assert error.value.status == 400
    assert knowledge_base.vectors.collections() == []


async def test_index_files_are_rewritten_only_after_many_changes_and_caught_up_at_start(
        tmp_path: Path, chunker: Chunker, embedder: object) -> None:
    kb = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu", snapshot_changes=6)  # type: ignore[arg-type]
    ids = await _ingest(kb)  # 4 chunks: under the threshold
    assert kb.save_indexes() == 0
    path = tmp_path / "indexes" / "1.rvix"
    assert not path.exists()
    await kb.ingest("manuals", [make_document(f"extra{i}.txt", f"Extra note {i} on filters.") for i in range(2)],
                    chunk_size=64, chunk_overlap=0)
    assert kb.save_indexes() == 1  # 6 changes: written once
    saved = path.read_bytes()
    assert kb.save_indexes() == 0
    kb.delete_document("manuals", ids[0])
    assert kb.save_indexes() == 0 and path.read_bytes() == saved
    kb.vectors.store.close()  # a crash: the file misses the delete, SQLite has it
    reopened = KnowledgeBase(tmp_path, chunker, embedder, index_backend="faiss-cpu")  # type: ignore[arg-type]
    try:
        assert reopened.vectors.index_of(reopened.vectors.store.collections()[0]).size == 5
        assert reopened.integrity_problems() == []
        hits = await _hits(reopened, "descale the pump", ["manuals"], top_k=5, search_type="dense")
        assert "pump.txt" not in [h.chunk.document_name for h in hits]
    finally:
        reopened.close()


async def test_hybrid_search_says_when_dense_and_sparse_rank_the_same_chunk_first(
        knowledge_base: KnowledgeBase) -> None:
    await _ingest(knowledge_base)
    agreed = await knowledge_base.search("What does error E42 on the boiler mean?", ["manuals"], top_k=3)
    assert agreed.hits[0].chunk.document_name == "boiler.txt" and agreed.unanimous
    for search_type in ("dense", "sparse"):  # one ranking: nothing to agree with
        alone = await knowledge_base.search("What does error E42 on the boiler mean?", ["manuals"], top_k=3,
                                            search_type=search_type)
        assert alone.hits[0].chunk.document_name == "boiler.txt" and not alone.unanimous
    split = await knowledge_base.search("hold the button on the boiler", ["manuals"], top_k=3)
    assert split.hits and not split.unanimous  # dense puts the boiler first, BM25 the router ("hold", "button")
    no_words = await knowledge_base.search("How do I restart my wifi box?", ["manuals"], top_k=3)
    assert no_words.hits and not no_words.unanimous  # BM25 finds none of these words: dense alone ranks
