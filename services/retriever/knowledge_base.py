"""Collections of chunked, embedded documents, and search over them (dense, sparse BM25, hybrid by RRF).

Ingestion order is what makes it crash-safe: chunk and embed first (nothing stored), then one SQLite
transaction writes documents, chunks, vectors and full-text rows (the commit point), then the in-memory
vector index is updated. A vector index file behind SQLite is rebuilt from the stored vectors at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import APIError, bad_request, not_found
from services.retriever.chunking import Chunker
from services.retriever.dependencies import EmbeddingClient, RerankClient
from services.retriever.loaders import SourceDocument
from services.retriever.store import ChunkRow, Collection, NewChunk, NewDocument, Store, valid_collection_name
from services.retriever.vector_index import TorchExactIndex, VectorIndex, faiss_gpu_available, torch_cuda_available

log = logging.getLogger(__name__)

RRF_K = 60
_SAVE_INTERVAL_S = 5.0
AnyIndex = VectorIndex | TorchExactIndex


@dataclass(slots=True)
class Hit:
    chunk: ChunkRow
    score: float


@dataclass(slots=True)
class IngestOutcome:
    document_id: str
    document_name: str
    status: str  # "ingested" or "unchanged"
    chunks: int


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse ranked id lists: score(id) = sum over lists of 1 / (k + rank), rank from 1; best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))


class KnowledgeBase:
    def __init__(self, data_dir: Path, chunker: Chunker, embedder: EmbeddingClient, *, ann_threshold: int = 20_000,
                 reranker: RerankClient | None = None, index_backend: str = "auto") -> None:
        self.data_dir = data_dir
        self.chunker, self.embedder, self.reranker = chunker, embedder, reranker
        self.ann_threshold = ann_threshold
        self.index_backend = _choose_backend(index_backend)
        self.store = Store(data_dir / "retriever.sqlite3")
        self._indexes: dict[int, AnyIndex] = {}
        self._write_lock = threading.Lock()  # one writer at a time keeps SQLite versions and the index in step
        self._dirty: dict[int, float] = {}
        self._open_indexes()

    def close(self) -> None:
        self.save_indexes(force=True)
        self.store.close()

    # start-up and persistence

    def _index_path(self, collection: Collection) -> Path:
        return self.data_dir / "indexes" / f"{collection.id}.rvix"

    def _open_indexes(self) -> None:
        (self.data_dir / "indexes").mkdir(parents=True, exist_ok=True)
        for collection in self.store.collections():
            self._indexes[collection.id] = self._load_or_rebuild(collection)

    def _load_or_rebuild(self, collection: Collection) -> AnyIndex:
        _, chunks = self.store.collection_stats(collection.id)
        path = self._index_path(collection)
        if self.index_backend != "torch" and path.exists():
            try:
                index = VectorIndex.load(path, ann_threshold=self.ann_threshold,
                                         use_gpu=self.index_backend == "faiss-gpu")
                if index.version == collection.version and index.size == chunks:
                    log.info("collection %s: loaded %s index with %d vectors", collection.name, index.kind, chunks)
                    return index
                log.warning("collection %s: index file is at version %d with %d vectors, SQLite at %d with %d; "
                            "rebuilding", collection.name, index.version, index.size, collection.version, chunks)
            except (OSError, ValueError, RuntimeError) as exc:
                log.warning("collection %s: index file unreadable (%s); rebuilding", collection.name, exc)
        return self._rebuild(collection)

    def _rebuild(self, collection: Collection) -> AnyIndex:
        started = time.perf_counter()
        ids, vectors = self.store.all_vectors(collection.id)
        index = self._new_index(collection.dimension or (vectors.shape[1] if len(ids) else 1))
        index.build(ids, vectors)
        index.version = collection.version
        index.save(self._index_path(collection))
        log.info("collection %s: built %s index over %d vectors in %.2fs", collection.name, index.kind, len(ids),
                 time.perf_counter() - started)
        return index

    def _new_index(self, dimension: int) -> AnyIndex:
        if self.index_backend == "torch":
            return TorchExactIndex(dimension, device="cuda")
        return VectorIndex(dimension, ann_threshold=self.ann_threshold, use_gpu=self.index_backend == "faiss-gpu")

    def save_indexes(self, force: bool = False) -> None:
        """Save indexes changed since their last save (at most every few seconds unless forced)."""
        now = time.monotonic()
        with self._write_lock:
            for collection_id, since in list(self._dirty.items()):
                if force or now - since >= _SAVE_INTERVAL_S:
                    collection = next((c for c in self.store.collections() if c.id == collection_id), None)
                    if collection is not None and collection_id in self._indexes:
                        self._indexes[collection_id].save(self._index_path(collection))
                    del self._dirty[collection_id]

    def index_of(self, collection: Collection) -> AnyIndex:
        return self._indexes[collection.id]

    # collections

    def create_collection(self, name: str, description: str = "", metadata: dict | None = None) -> Collection:
        if not valid_collection_name(name):
            raise bad_request("collection name must be 1-128 letters, digits, '_', '-' or '.', starting with a letter "
                              "or digit", param="name")
        with self._write_lock:
            if self.store.collection(name) is not None:
                raise APIError(409, f"collection {name!r} already exists", param="name")
            collection = self.store.create_collection(name, description, metadata)
            self._indexes[collection.id] = self._new_index(1)
        log.info("created collection %s", name)
        return collection

    def collection(self, name: str) -> Collection:
        collection = self.store.collection(name)
        if collection is None:
            raise not_found(f"collection {name!r} does not exist", param="collection_name")
        return collection

    def describe(self, collection: Collection) -> dict:
        documents, chunks = self.store.collection_stats(collection.id)
        index = self._indexes.get(collection.id)
        return {"name": collection.name, "description": collection.description, "metadata": collection.metadata,
                "documents": documents, "chunks": chunks, "dimension": collection.dimension,
                "index": index.kind if index is not None else None, "created": int(collection.created)}

    def delete_collection(self, name: str) -> None:
        collection = self.collection(name)
        with self._write_lock:
            self.store.delete_collection(collection)
            self._indexes.pop(collection.id, None)
            self._dirty.pop(collection.id, None)
            self._index_path(collection).unlink(missing_ok=True)
        log.info("deleted collection %s", name)

    # documents

    async def ingest(self, collection_name: str, documents: list[SourceDocument], *, chunk_size: int,
                     chunk_overlap: int) -> list[IngestOutcome]:
        collection = self.collection(collection_name)
        if chunk_overlap >= chunk_size:
            raise bad_request(f"chunk_overlap ({chunk_overlap}) must be smaller than chunk_size ({chunk_size})",
                              param="chunk_overlap")
        unique = list({document.id: document for document in documents}.values())
        existing = await asyncio.to_thread(self.store.existing_document_ids, collection.id, [d.id for d in unique])
        fresh = [d for d in unique if d.id not in existing]
        prepared = await asyncio.to_thread(self._chunk_documents, fresh, chunk_size, chunk_overlap)
        texts = [chunk.content for document in prepared for chunk in document.chunks]
        if texts:
            vectors = await self.embedder.embed(texts, input_type="passage")
            position = 0
            for document in prepared:
                for chunk in document.chunks:
                    chunk.vector = vectors[position]
                    position += 1
        prepared = [d for d in prepared if d.chunks]
        if prepared:
            await asyncio.to_thread(self._commit, collection, prepared)
        chunk_counts = {d.id: len(d.chunks) for d in prepared}
        outcomes = [IngestOutcome(d.id, d.name, "unchanged" if d.id in existing or d.id not in chunk_counts
                                  else "ingested", chunk_counts.get(d.id, 0)) for d in unique]
        log.info("collection %s: %d documents ingested (%d chunks), %d unchanged", collection_name,
                 len(prepared), len(texts), len(unique) - len(prepared))
        return outcomes

    def _chunk_documents(self, documents: list[SourceDocument], size: int, overlap: int) -> list[NewDocument]:
        prepared = []
        for document in documents:
            chunks = [NewChunk(piece.text, {**document.metadata, **section.metadata}, np.zeros(0, np.float32))
                      for section in document.sections
                      for piece in self.chunker.chunk(section.text, size, overlap)]
            prepared.append(NewDocument(document.id, document.name, document.metadata, chunks))
        return prepared

    def _commit(self, collection: Collection, documents: list[NewDocument]) -> None:
        with self._write_lock:
            row_ids, vectors, version = self.store.add_documents(collection, documents)
            index = self._indexes[collection.id]
            if index.size == 0 and index.dimension != vectors.shape[1] and len(row_ids):
                index = self._indexes[collection.id] = self._new_index(vectors.shape[1])
            index.add(np.asarray(row_ids, np.int64), vectors)
            index.version = version
            if index.needs_rebuild():
                ids, stored = self.store.all_vectors(collection.id)
                index.build(ids, stored)
            self._dirty.setdefault(collection.id, time.monotonic())

    def delete_document(self, collection_name: str, document_id: str) -> None:
        collection = self.collection(collection_name)
        with self._write_lock:
            removed = self.store.delete_document(collection, document_id)
            if removed is None:
                raise not_found(f"document {document_id!r} is not in collection {collection_name!r}",
                                param="document_id")
            row_ids, version = removed
            index = self._indexes[collection.id]
            index.remove(np.asarray(row_ids, np.int64))
            index.version = version
            self._dirty.setdefault(collection.id, time.monotonic())

    def documents(self, collection_name: str, limit: int, offset: int) -> list[dict]:
        return self.store.documents(self.collection(collection_name).id, limit, offset)

    # search

    async def search(self, query: str, collection_names: list[str], *, top_k: int, search_type: str = "hybrid",
                     metadata_filter: dict | None = None, rerank: bool = False,
                     reranker_top_k: int | None = None) -> list[Hit]:
        collections = [self.collection(name) for name in dict.fromkeys(collection_names)]
        depth = top_k if search_type != "hybrid" else max(2 * top_k, 50)
        allowed = {c.id: (await asyncio.to_thread(self.store.matching_chunk_ids, c.id, metadata_filter)
                          if metadata_filter else None) for c in collections}
        rankings: list[list[tuple[int, float]]] = []
        if search_type in ("dense", "hybrid"):
            query_vector = (await self.embedder.embed([query], input_type="query"))[0]
            rankings.append(await asyncio.to_thread(self._dense, collections, query_vector, depth, allowed))
        if search_type in ("sparse", "hybrid"):
            rankings.append(await asyncio.to_thread(self._sparse, collections, query, depth, allowed))
        if search_type == "hybrid":
            ranked = reciprocal_rank_fusion([[i for i, _ in ranking] for ranking in rankings])[:top_k]
        else:
            ranked = rankings[0][:top_k]
        rows = await asyncio.to_thread(self.store.chunks, [i for i, _ in ranked])
        hits = [Hit(rows[i], score) for i, score in ranked if i in rows]
        if rerank:
            hits = await self._rerank(query, hits, reranker_top_k or top_k)
        return hits

    def _dense(self, collections: list[Collection], query: np.ndarray, k: int,
               allowed: dict[int, np.ndarray | None]) -> list[tuple[int, float]]:
        found: list[tuple[int, float]] = []
        for collection in collections:
            index = self._indexes[collection.id]
            if index.size == 0:
                continue
            if index.dimension != query.shape[0]:
                raise APIError(500, f"collection {collection.name!r} holds {index.dimension}-d vectors but the "
                                    f"embedding model gives {query.shape[0]}-d; re-ingest with the same model")
            scores, ids = index.search(query[None, :], k, allowed[collection.id])
            found.extend((int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0)
        return sorted(found, key=lambda pair: -pair[1])[:k]

    def _sparse(self, collections: list[Collection], query: str, k: int,
                allowed: dict[int, np.ndarray | None]) -> list[tuple[int, float]]:
        found: list[tuple[int, float]] = []
        for collection in collections:
            found.extend(self.store.bm25_search(collection.id, query, k, allowed[collection.id]))
        return sorted(found, key=lambda pair: -pair[1])[:k]

    async def _rerank(self, query: str, hits: list[Hit], keep: int) -> list[Hit]:
        if self.reranker is None or not hits:
            return hits[:keep]
        ranked = await self.reranker.rank(query, [hit.chunk.content for hit in hits])
        return [Hit(hits[index].chunk, logit) for index, logit in ranked[:keep]]

    def integrity_problems(self) -> list[str]:
        """Anything dangling: rows without parents, or index entries that SQLite does not know (and the reverse)."""
        problems = self.store.integrity_problems()
        for collection in self.store.collections():
            ids, _ = self.store.all_vectors(collection.id)
            indexed = np.sort(self._indexes[collection.id].ids()) if collection.id in self._indexes else np.zeros(0)
            if not np.array_equal(np.sort(ids), indexed):
                problems.append(f"collection {collection.name}: index holds {len(indexed)} ids, SQLite {len(ids)}")
        return problems


def _choose_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    if faiss_gpu_available():
        return "faiss-gpu"
    if torch_cuda_available():
        return "torch"
    return "faiss-cpu"
