"""The `milvus` vector store against a real Milvus engine: milvus-lite, embedded, one database file per test.

The knowledge base on top is the same one the local store serves; the last tests run both stores on the same
documents and compare what they return.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import APIError
from services.retriever.chunking import Chunker
from services.retriever.knowledge_base import Hit, KnowledgeBase
from services.retriever.loaders import make_document
from services.retriever.milvus_store import (
    MilvusStore,
    chunk_key,
    metadata_expression,
    milvus_name,
    stemmed_terms,
    string_literal,
)
from services.retriever.store import CollectionGone, NeedsEmbedding, NewChunk, NewDocument
from services.retriever.vector_store import VectorStore

pytestmark = pytest.mark.anyio

FACTS = {
    "pump.txt": "The Aquaflow 300 pump must be descaled every 90 days with citric acid.",
    "boiler.txt": "The Thermax boiler shows error E42 when the water pressure drops below 0.8 bar.",
    "garden.txt": "Tomatoes need six hours of sun and deep watering twice a week.",
    "router.txt": "Reset the Netlink router by holding the recessed button for ten seconds.",
}


@pytest.fixture
def milvus(tmp_path: Path) -> Iterator[MilvusStore]:
    store = MilvusStore(str(tmp_path / "milvus.db"))
    yield store
    store.close()


@pytest.fixture
def milvus_kb(milvus: MilvusStore, chunker: Chunker, embedder: object, tmp_path: Path) -> KnowledgeBase:
    return KnowledgeBase(tmp_path, chunker, embedder, vector_store=milvus)  # type: ignore[arg-type]


async def _ingest(kb: KnowledgeBase, name: str = "manuals") -> list[str]:
    if kb.vectors.collection(name) is None:
        kb.create_collection(name)
    documents = [make_document(file, text, {"source": file, "kind": "appliance" if file != "garden.txt" else "plant",
                                            "year": 2024 if file != "router.txt" else 2023, "shared": True},
                               source=f"/docs/{file}")
                 for file, text in FACTS.items()]
    result = await kb.ingest(name, documents, chunk_size=512, chunk_overlap=128)
    return [o.document_id for o in result.documents]


async def _hits(kb: KnowledgeBase, query: str, collections: list[str], **options: object) -> list[Hit]:
    return (await kb.search(query, collections, **options)).hits  # type: ignore[arg-type]


def test_names_keys_and_expressions() -> None:
    assert milvus_name("my-docs.v1_a") == "my_hdocs_dv1__a"
    assert milvus_name("a-hb") != milvus_name("a_hb")  # "_" doubled: two names never share a spelling
    assert chunk_key("c", "d", "f", 0) == chunk_key("c", "d", "f", 0) != chunk_key("c", "d", "f", 1)
    assert 0 <= chunk_key("c", "d", "f", 0) < 2**63
    assert stemmed_terms("Descaling the PUMPS, quickly!") == "descal the pump quickli"
    assert metadata_expression({"team": "ops", "year": {"$in": [2023, 2024]}, 'we"ird': True}) == (
        '(metadata["team"] == "ops") and (metadata["year"] == 2023 or metadata["year"] == 2024) and '
        '(metadata["we\\"ird"] == true)')
    assert metadata_expression({"k": {"$in": []}}) == "false"
    assert string_literal('ü "q" \\ \n\t\x07') == '"ü \\"q\\" \\\\ \\n\\t\x07"'  # no \uXXXX: Milvus lacks it


async def test_ids_and_metadata_beyond_ascii_are_stored_found_and_deleted(milvus_kb: KnowledgeBase) -> None:
    # Found by the schema fuzz: JSON's \uXXXX escapes in a Milvus expression were a 500 on ingest.
    milvus_kb.create_collection("intl")
    odd = ["ünïcode/ñ", "emoji \U0001F600", "bell\x07 and \"quote\"", "tab\tnew\nline\\"]
    result = await milvus_kb.ingest("intl", [make_document(i, f"Document number {n} about pumps.", {"tag": i}, i)
                                             for n, i in enumerate(odd)], chunk_size=512, chunk_overlap=128)
    assert [o.status for o in result.documents] == ["ingested"] * len(odd)
    for value in odd:
        hits = await _hits(milvus_kb, "pumps", ["intl"], top_k=5, search_type="sparse", metadata_filter={"tag": value})
        assert [h.chunk.document_id for h in hits] == [value]
    for value in odd:
        milvus_kb.delete_document("intl", value)
    assert milvus_kb.documents("intl", 10, 0) == []


async def test_integers_past_64_bits_in_metadata_are_stored_and_filtered_as_floats(milvus_kb: KnowledgeBase) -> None:
    # Found by the schema fuzz: Milvus JSON holds no integer past 64 bits; the upload was a 500.
    milvus_kb.create_collection("big", metadata={"n": 2**70})
    document = make_document("big.txt", "A very large serial number.", {"serial": 2**70, "nested": [{"k": -(2**64)}]})
    assert [o.status for o in (await milvus_kb.ingest("big", [document], chunk_size=512, chunk_overlap=128)).documents
            ] == ["ingested"]
    hits = await _hits(milvus_kb, "serial", ["big"], top_k=5, search_type="sparse", metadata_filter={"serial": 2**70})
    assert [h.chunk.document_name for h in hits] == ["big.txt"]
    assert hits[0].chunk.metadata["serial"] == float(2**70)


@pytest.mark.parametrize("search_type", ["dense", "sparse", "hybrid"])
async def test_each_search_type_finds_the_document_with_the_answer(milvus_kb: KnowledgeBase,
                                                                  search_type: str) -> None:
    await _ingest(milvus_kb)
    hits = await _hits(milvus_kb, "What does error E42 on the boiler mean?", ["manuals"], top_k=3,
                       search_type=search_type)
    assert hits[0].chunk.document_name == "boiler.txt"
    assert hits[0].chunk.metadata["source"] == "boiler.txt"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].score > 0


async def test_sparse_search_stems_like_the_local_store(milvus_kb: KnowledgeBase) -> None:
    await _ingest(milvus_kb)
    hits = await _hits(milvus_kb, "descaling pumps", ["manuals"], top_k=2, search_type="sparse")
    assert [h.chunk.document_name for h in hits] == ["pump.txt"]  # "descaled"/"pump" match through the stems


async def test_filters_on_document_metadata(milvus_kb: KnowledgeBase) -> None:
    await _ingest(milvus_kb)
    for search_type in ("dense", "sparse", "hybrid"):
        plants = await _hits(milvus_kb, "water", ["manuals"], top_k=5, search_type=search_type,
                             metadata_filter={"kind": "plant"})
        assert [h.chunk.document_name for h in plants] == ["garden.txt"], search_type
    older = await _hits(milvus_kb, "reset button", ["manuals"], top_k=5, search_type="dense",
                        metadata_filter={"year": {"$in": [2023]}, "shared": True})
    assert [h.chunk.document_name for h in older] == ["router.txt"]
    assert await _hits(milvus_kb, "water", ["manuals"], top_k=5, metadata_filter={"kind": "rock"}) == []


async def test_upsert_statuses_replacement_and_deletion(milvus_kb: KnowledgeBase) -> None:
    ids = await _ingest(milvus_kb)
    again = await milvus_kb.ingest("manuals", [make_document("pump.txt", FACTS["pump.txt"], {"source": "pump.txt"},
                                                             source="/docs/pump.txt")],
                                   chunk_size=512, chunk_overlap=128)
    assert [o.status for o in again.documents] == ["unchanged"]
    changed = await milvus_kb.ingest("manuals", [make_document(
        "pump.txt", "The Aquaflow 300 pump is now descaled every 60 days.", {"source": "pump.txt"},
        source="/docs/pump.txt")], chunk_size=512, chunk_overlap=128)
    assert [o.status for o in changed.documents] == ["updated"] and changed.replaced == [ids[0]]
    hits = await _hits(milvus_kb, "how often is the Aquaflow pump descaled", ["manuals"], top_k=1,
                       search_type="dense")
    assert "60 days" in hits[0].chunk.content
    assert milvus_kb.describe(milvus_kb.collection("manuals"))["documents"] == 4
    assert milvus_kb.integrity_problems() == []
    milvus_kb.delete_document("manuals", ids[1])
    with pytest.raises(APIError) as missing:
        milvus_kb.delete_document("manuals", ids[1])
    assert missing.value.status == 404
    described = milvus_kb.describe(milvus_kb.collection("manuals"))
    assert (described["documents"], described["chunks"], described["index"]) == (3, 3, "hnsw")
    assert "boiler.txt" not in [d["document_name"] for d in milvus_kb.documents("manuals", 10, 0)]


async def test_collections_are_separate_and_searchable_together(milvus_kb: KnowledgeBase) -> None:
    await _ingest(milvus_kb, "first")
    milvus_kb.create_collection("second-set.v2")
    await milvus_kb.ingest("second-set.v2", [make_document("note.txt", "The espresso grinder needs new burrs.")],
                           chunk_size=512, chunk_overlap=128)
    hits = await _hits(milvus_kb, "grinder burrs", ["first", "second-set.v2"], top_k=2)
    assert hits[0].chunk.collection == "second-set.v2"
    assert {h.chunk.collection for h in hits} == {"first", "second-set.v2"}
    with pytest.raises(APIError) as exists:
        milvus_kb.create_collection("first")
    assert exists.value.status == 409
    milvus_kb.delete_collection("first")
    assert [c.name for c in milvus_kb.vectors.collections()] == ["second-set.v2"]


def test_write_rules_at_the_store(milvus: MilvusStore) -> None:
    collection = milvus.create_collection("c")
    vector = np.ones(4, np.float32)
    document = NewDocument("d", "d.txt", {}, "f1", "", [NewChunk("text", {}, vector)])
    assert milvus.write_documents(collection, [document], set()).statuses == {"d": "ingested"}
    with pytest.raises(NeedsEmbedding):  # "stored as f2", but it is not: the caller must embed it
        milvus.write_documents(collection, [NewDocument("d", "d.txt", {}, "f2", "", None)], set())
    with pytest.raises(ValueError, match="dimension"):
        milvus.write_documents(collection, [NewDocument("e", "e.txt", {}, "f", "", [NewChunk("x", {}, np.ones(3))])],
                               set())
    gone = milvus.collection("c")
    assert gone is not None
    milvus.delete_collection(gone)
    with pytest.raises(CollectionGone):
        milvus.write_documents(gone, [document], set())
    with pytest.raises(CollectionGone):
        milvus.dense_search([gone], vector, 3, None)


async def test_a_second_store_on_the_same_database_sees_every_write(milvus_kb: KnowledgeBase, milvus: MilvusStore,
                                                                    chunker: Chunker, embedder: object,
                                                                    tmp_path: Path) -> None:
    """What makes replicas stateless: nothing is cached per process, a fresh store reads all from Milvus."""
    await _ingest(milvus_kb)
    milvus.close()
    replica = KnowledgeBase(tmp_path / "other", chunker, embedder,  # type: ignore[arg-type]
                            vector_store=MilvusStore(str(tmp_path / "milvus.db")))
    try:
        hits = await _hits(replica, "reset the router", ["manuals"], top_k=1)
        assert hits[0].chunk.document_name == "router.txt"
        assert replica.describe(replica.collection("manuals"))["documents"] == 4
    finally:
        replica.close()


async def test_local_and_milvus_return_the_same_ranking(milvus_kb: KnowledgeBase, knowledge_base: KnowledgeBase
                                                        ) -> None:
    stores: list[VectorStore] = [knowledge_base.vectors, milvus_kb.vectors]
    assert [s.kind for s in stores] == ["local", "milvus"]
    await _ingest(knowledge_base)
    await _ingest(milvus_kb)
    for query in ("boiler pressure error", "how long does the router button take", "watering tomatoes"):
        for search_type in ("dense", "sparse", "hybrid"):
            local = await _hits(knowledge_base, query, ["manuals"], top_k=4, search_type=search_type)
            remote = await _hits(milvus_kb, query, ["manuals"], top_k=4, search_type=search_type)
            assert [h.chunk.document_name for h in local] == [h.chunk.document_name for h in remote], (query,
                                                                                                   search_type)
            if search_type == "dense":
                assert np.allclose([h.score for h in local], [h.score for h in remote], atol=2e-3)
            assert [h.chunk.metadata for h in local] == [h.chunk.metadata for h in remote]
