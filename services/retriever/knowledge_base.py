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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import APIError, bad_request, not_found
from common.http import DependencyError
from services.retriever.chunking import Chunker
from services.retriever.dependencies import EmbeddingClient, RerankClient
from services.retriever.loaders import SourceDocument
from services.retriever.store import (
    ChunkRow,
    Collection,
    CollectionGone,
    NeedsEmbedding,
    NewChunk,
    NewDocument,
    Store,
    WriteResult,
    valid_collection_name,
)
from services.retriever.vector_index import TorchExactIndex, VectorIndex, faiss_gpu_available, torch_cuda_available

log = logging.getLogger(__name__)

RRF_K = 60
AnyIndex = VectorIndex | TorchExactIndex
_EMBED_ROUNDS = 3  # documents changed by a concurrent request are re-embedded at most this often


@dataclass(slots=True)
class Hit:
    chunk: ChunkRow
    score: float


@dataclass(slots=True)
class IngestOutcome:
    document_id: str
    document_name: str
    status: str  # "ingested", "updated" or "unchanged"
    chunks: int


@dataclass(slots=True)
class IngestResult:
    documents: list[IngestOutcome]
    replaced: list[str]  # ids of older documents that re-ingested files no longer hold


@dataclass(slots=True)
class SearchResult:
    hits: list[Hit]
    warnings: list[str] = field(default_factory=list)  # what was left out and why (a dependency was down)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Fuse ranked id lists: score(id) = sum over lists of 1 / (k + rank), rank from 1; best first."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda pair: (-pair[1], pair[0]))


class KnowledgeBase:
    """Collections, ingestion and search. Methods that touch SQLite or an index block: async callers run them in
    a thread (the async methods here already do)."""

    def __init__(self, data_dir: Path, chunker: Chunker, embedder: EmbeddingClient, *, ann_threshold: int = 20_000,
                 reranker: RerankClient | None = None, index_backend: str = "auto", max_query_chars: int = 8192,
                 snapshot_changes: int = 1024) -> None:
        self.data_dir = data_dir
        self.chunker, self.embedder, self.reranker = chunker, embedder, reranker
        self.ann_threshold = ann_threshold
        self.max_query_chars = max_query_chars
        self.snapshot_changes = snapshot_changes
        self.index_backend = _choose_backend(index_backend)
        self.store = Store(data_dir / "retriever.sqlite3")
        self._indexes: dict[int, AnyIndex] = {}
        self._write_lock = threading.Lock()  # one writer at a time keeps SQLite versions and the index in step
        self._changes: dict[int, int] = {}  # vectors added or removed per collection since its index file was saved
        self._open_indexes()

    def close(self) -> None:
        try:
            self.save_indexes(force=True)
        finally:
            self.store.close()

    # start-up and persistence

    def _index_path(self, collection: Collection) -> Path:
        return self.data_dir / "indexes" / f"{collection.id}.rvix"

    def _open_indexes(self) -> None:
        (self.data_dir / "indexes").mkdir(parents=True, exist_ok=True)
        for collection in self.store.collections():
            self._indexes[collection.id] = self._load_or_rebuild(collection)

    def _load_or_rebuild(self, collection: Collection) -> AnyIndex:
        """The saved index caught up with SQLite (which holds every vector), or a fresh build if there is none."""
        path = self._index_path(collection)
        if self.index_backend == "torch" or not path.exists():
            return self._rebuild(collection)
        try:
            index = VectorIndex.load(path, ann_threshold=self.ann_threshold, use_gpu=self.index_backend == "faiss-gpu")
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("collection %s: index file unreadable (%s); rebuilding", collection.name, exc)
            return self._rebuild(collection)
        if collection.dimension is not None and index.dimension != collection.dimension:
            log.warning("collection %s: index file has %d-d vectors, SQLite %d-d; rebuilding", collection.name,
                        index.dimension, collection.dimension)
            return self._rebuild(collection)
        stored, indexed = self.store.chunk_ids(collection.id), index.ids()
        missing = np.setdiff1d(stored, indexed, assume_unique=True)
        extra = np.setdiff1d(indexed, stored, assume_unique=True)
        if len(missing):
            ids, vectors = self.store.vectors(missing.tolist())
            index.add(ids, vectors)
        index.remove(extra)
        index.version = collection.version
        if index.needs_rebuild():
            return self._rebuild(collection)
        log.info("collection %s: loaded %s index with %d vectors (%d added, %d removed to catch up with SQLite)",
                 collection.name, index.kind, index.size, len(missing), len(extra))
        self._changes[collection.id] = len(missing) + len(extra)
        return index

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

    def save_indexes(self, force: bool = False) -> int:
        """Rewrite the index files that fell far behind; returns how many were written.

        SQLite holds every vector and start-up adds what an index file lacks, so a file is rewritten only when
        the changes since its last save reach `snapshot_changes` and a quarter of its size (or when forced):
        the cost of saving stays proportional to what changed. Writers wait while an index is serialised,
        searches do not.
        """
        saved = 0
        for collection in self.store.collections():
            index = self._indexes.get(collection.id)
            changes = self._changes.get(collection.id, 0)
            if index is None or changes == 0:
                continue
            if force or changes >= max(self.snapshot_changes, index.size // 4):
                index.save(self._index_path(collection))
                self._changes[collection.id] = max(0, self._changes.get(collection.id, 0) - changes)
                saved += 1
        return saved

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
        described = {"name": collection.name, "description": collection.description,
                     "metadata": collection.metadata, "documents": documents, "chunks": chunks,
                     "dimension": collection.dimension, "index": index.kind if index is not None else None,
                     "created": int(collection.created)}
        if index is not None and index.kind == "ivf":
            described["nprobe"], described["measured_recall"] = index.nprobe, round(index.measured_recall, 4)
        return described

    def describe_all(self) -> list[dict]:
        return [self.describe(c) for c in self.store.collections()]

    def delete_collection(self, name: str) -> None:
        collection = self.collection(name)
        with self._write_lock:
            self.store.delete_collection(collection)
            self._indexes.pop(collection.id, None)
            self._changes.pop(collection.id, None)
            self._index_path(collection).unlink(missing_ok=True)
        log.info("deleted collection %s", name)

    # documents

    async def ingest(self, collection_name: str, documents: list[SourceDocument], *, chunk_size: int,
                     chunk_overlap: int) -> IngestResult:
        """Upsert documents: new ids are ingested, changed ones updated, and a re-ingested file path replaces
        the documents it held before (see README, "Updates")."""
        collection = await asyncio.to_thread(self.collection, collection_name)
        if chunk_overlap >= chunk_size:
            raise bad_request(f"chunk_overlap ({chunk_overlap}) must be smaller than chunk_size ({chunk_size})",
                              param="chunk_overlap")
        unique = list({document.id: document for document in documents}.values())
        stored = await asyncio.to_thread(self.store.fingerprints, collection.id, [d.id for d in unique])
        todo = {d.id for d in unique if stored.get(d.id) != d.fingerprint}
        prepared: dict[str, NewDocument] = {}
        for _ in range(_EMBED_ROUNDS):
            fresh = await self._prepare([d for d in unique if d.id in todo and d.id not in prepared],
                                        chunk_size, chunk_overlap)
            prepared.update((d.id, d) for d in fresh)
            writes = [prepared.get(d.id) or NewDocument(d.id, d.name, d.metadata, d.fingerprint, d.source, None)
                      for d in unique]
            writes = [w for w in writes if w.chunks is None or w.chunks]  # nothing to store for an empty text
            try:
                result = await asyncio.to_thread(self._commit, collection, writes,
                                                 {d.source for d in unique if d.source})
                break
            except NeedsEmbedding as changed:  # another request changed these documents since we looked
                todo.update(changed.document_ids)
        else:
            raise APIError(503, "these documents kept changing under concurrent requests; retry")
        outcomes = []
        for document in unique:
            status = result.statuses.get(document.id, "unchanged")
            written = prepared[document.id].chunks if status != "unchanged" else None
            outcomes.append(IngestOutcome(document.id, document.name, status, len(written or [])))
        counts = {status: sum(o.status == status for o in outcomes) for status in ("ingested", "updated", "unchanged")}
        log.info("collection %s: %d ingested, %d updated, %d unchanged, %d replaced", collection_name,
                 counts["ingested"], counts["updated"], counts["unchanged"], len(result.replaced))
        return IngestResult(outcomes, result.replaced)

    async def _prepare(self, documents: list[SourceDocument], size: int, overlap: int) -> list[NewDocument]:
        """Chunk (in a thread) and embed documents; nothing is stored yet."""
        prepared = await asyncio.to_thread(self._chunk_documents, documents, size, overlap)
        texts = [chunk.content for document in prepared for chunk in document.chunks or []]
        if texts:
            vectors = await self.embedder.embed(texts, input_type="passage")
            position = 0
            for document in prepared:
                for chunk in document.chunks or []:
                    chunk.vector = vectors[position]
                    position += 1
        return prepared

    def _chunk_documents(self, documents: list[SourceDocument], size: int, overlap: int) -> list[NewDocument]:
        prepared = []
        for document in documents:
            chunks = [NewChunk(piece.text, {**document.metadata, **section.metadata}, np.zeros(0, np.float32))
                      for section in document.sections
                      for piece in self.chunker.chunk(section.text, size, overlap)]
            prepared.append(NewDocument(document.id, document.name, document.metadata, document.fingerprint,
                                        document.source, chunks))
        return prepared

    def _commit(self, collection: Collection, documents: list[NewDocument], sources: set[str]) -> WriteResult:
        with self._write_lock:
            try:
                result = self.store.write_documents(collection.id, documents, sources)
            except CollectionGone as exc:
                raise not_found(f"collection {collection.name!r} was deleted", param="collection_name") from exc
            index = self._indexes[collection.id]
            index.remove(np.asarray(result.removed_ids, np.int64))
            if result.added_ids and index.size == 0 and index.dimension != result.added_vectors.shape[1]:
                index = self._indexes[collection.id] = self._new_index(result.added_vectors.shape[1])
            index.add(np.asarray(result.added_ids, np.int64), result.added_vectors)
            index.version = result.version
            if index.needs_rebuild():
                ids, stored = self.store.all_vectors(collection.id)
                index.build(ids, stored)
            self._note_changes(collection.id, len(result.added_ids) + len(result.removed_ids))
        return result

    def _note_changes(self, collection_id: int, count: int) -> None:
        if count:
            self._changes[collection_id] = self._changes.get(collection_id, 0) + count

    def delete_document(self, collection_name: str, document_id: str) -> None:
        collection = self.collection(collection_name)
        with self._write_lock:
            try:
                removed = self.store.delete_document(collection, document_id)
            except CollectionGone as exc:
                raise not_found(f"collection {collection_name!r} was deleted", param="collection_name") from exc
            if removed is None:
                raise not_found(f"document {document_id!r} is not in collection {collection_name!r}",
                                param="document_id")
            row_ids, version = removed
            index = self._indexes[collection.id]
            index.remove(np.asarray(row_ids, np.int64))
            index.version = version
            self._note_changes(collection.id, len(row_ids))

    def documents(self, collection_name: str, limit: int, offset: int) -> list[dict]:
        return self.store.documents(self.collection(collection_name).id, limit, offset)

    # search

    async def search(self, query: str, collection_names: list[str], *, top_k: int, search_type: str = "hybrid",
                     metadata_filter: dict | None = None, rerank: bool = False,
                     reranker_top_k: int | None = None) -> SearchResult:
        """Best chunks first. With hybrid search and the embedder down, BM25 alone answers (and a warning says
        so); with the reranker down, the unreranked order stands (likewise). Dense search needs the embedder."""
        if len(query) > self.max_query_chars:
            raise APIError(413, f"query is {len(query)} characters, over the limit of {self.max_query_chars}",
                           param="query")
        names = list(dict.fromkeys(collection_names))
        collections = await asyncio.to_thread(lambda: [self.collection(name) for name in names])
        depth = top_k if search_type != "hybrid" else max(2 * top_k, 50)
        allowed = await asyncio.to_thread(self._allowed, collections, metadata_filter)
        warnings: list[str] = []
        rankings: list[list[tuple[int, float]]] = []
        if search_type in ("dense", "hybrid"):
            try:
                query_vector = (await self.embedder.embed([query], input_type="query"))[0]
            except DependencyError as exc:
                if search_type == "dense":
                    raise
                log.warning("hybrid search without its dense half: %s", exc.message)
                warnings.append(f"{exc.message}; hybrid search used BM25 (sparse) only")
            else:
                rankings.append(await asyncio.to_thread(self._dense, collections, query_vector, depth, allowed))
        if search_type in ("sparse", "hybrid"):
            rankings.append(await asyncio.to_thread(self._sparse, collections, query, depth, allowed))
        if len(rankings) == 2:
            ranked = reciprocal_rank_fusion([[i for i, _ in ranking] for ranking in rankings])[:top_k]
        else:
            ranked = rankings[0][:top_k]
        rows = await asyncio.to_thread(self.store.chunks, [i for i, _ in ranked])
        hits = [Hit(rows[i], score) for i, score in ranked if i in rows]
        if rerank:
            keep = reranker_top_k or top_k
            try:
                hits = await self._rerank(query, hits, keep)
            except DependencyError as exc:
                log.warning("answering without reranking: %s", exc.message)
                warnings.append(f"{exc.message}; results are not reranked")
                hits = hits[:keep]
        return SearchResult(hits, warnings)

    def _allowed(self, collections: list[Collection],
                 metadata_filter: dict | None) -> dict[int, np.ndarray | None]:
        try:
            return {c.id: self.store.matching_chunk_ids(c.id, metadata_filter) if metadata_filter else None
                    for c in collections}
        except CollectionGone as exc:
            raise _gone(collections, exc) from exc

    def _dense(self, collections: list[Collection], query: np.ndarray, k: int,
               allowed: dict[int, np.ndarray | None]) -> list[tuple[int, float]]:
        found: list[tuple[int, float]] = []
        for collection in collections:
            index = self._indexes.get(collection.id)
            if index is None:
                raise _gone(collections, CollectionGone(collection.id))
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
        try:
            for collection in collections:
                found.extend(self.store.bm25_search(collection.id, query, k, allowed[collection.id]))
        except CollectionGone as exc:
            raise _gone(collections, exc) from exc
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
            ids = self.store.chunk_ids(collection.id)
            indexed = np.sort(self._indexes[collection.id].ids()) if collection.id in self._indexes else np.zeros(0)
            if not np.array_equal(np.sort(ids), indexed):
                problems.append(f"collection {collection.name}: index holds {len(indexed)} ids, SQLite {len(ids)}")
        return problems


def _gone(collections: list[Collection], exc: CollectionGone) -> APIError:
    name = next((c.name for c in collections if c.id == exc.args[0]), "?")
    return not_found(f"collection {name!r} was deleted", param="collection_names")


def _choose_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    if faiss_gpu_available():
        return "faiss-gpu"
    if torch_cuda_available():
        return "torch"
    return "faiss-cpu"
