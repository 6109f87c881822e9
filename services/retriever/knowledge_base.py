"""Collections of chunked, embedded documents, and search over them (dense, sparse BM25, hybrid by RRF).

Ingestion chunks and embeds first (nothing stored), then hands the documents to the vector store in one write
(services/retriever/vector_store.py: SQLite + FAISS, or Milvus), which is the commit point.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import APIError, bad_request, not_found
from common.http import DependencyError
from services.retriever.chunking import Chunker
from services.retriever.dependencies import EmbeddingClient, RerankClient
from services.retriever.loaders import SourceDocument
from services.retriever.local_store import LocalStore
from services.retriever.store import (
    ChunkRow,
    Collection,
    CollectionGone,
    NeedsEmbedding,
    NewChunk,
    NewDocument,
    WriteResult,
    valid_collection_name,
)
from services.retriever.vector_store import VectorStore

log = logging.getLogger(__name__)

RRF_K = 60
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
    unanimous: bool = False  # hybrid search: dense and sparse both ranked the first hit first (and a reranker too)


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
                 snapshot_changes: int = 1024, vector_store: VectorStore | None = None) -> None:
        self.chunker, self.embedder, self.reranker = chunker, embedder, reranker
        self.max_query_chars = max_query_chars
        self.vectors = vector_store or LocalStore(data_dir, ann_threshold=ann_threshold, index_backend=index_backend,
                                                  snapshot_changes=snapshot_changes)
        self._create_lock = threading.Lock()

    def close(self) -> None:
        self.vectors.close()

    def save_indexes(self, force: bool = False) -> int:
        return self.vectors.save(force)

    # collections

    def create_collection(self, name: str, description: str = "", metadata: dict | None = None) -> Collection:
        if not valid_collection_name(name):
            raise bad_request("collection name must be 1-128 letters, digits, '_', '-' or '.', starting with a letter "
                              "or digit", param="name")
        with self._create_lock:
            if self.vectors.collection(name) is not None:
                raise APIError(409, f"collection {name!r} already exists", param="name")
            collection = self.vectors.create_collection(name, description, metadata)
        log.info("created collection %s", name)
        return collection

    def collection(self, name: str) -> Collection:
        collection = self.vectors.collection(name)
        if collection is None:
            raise not_found(f"collection {name!r} does not exist", param="collection_name")
        return collection

    def describe(self, collection: Collection) -> dict:
        return {"name": collection.name, "description": collection.description, "metadata": collection.metadata,
                "dimension": collection.dimension, "created": int(collection.created),
                **self.vectors.describe(collection)}

    def describe_all(self) -> list[dict]:
        return [self.describe(c) for c in self.vectors.collections()]

    def delete_collection(self, name: str) -> None:
        collection = self.collection(name)
        self.vectors.delete_collection(collection)
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
        stored = await asyncio.to_thread(self.vectors.fingerprints, collection, [d.id for d in unique])
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
        try:
            return self.vectors.write_documents(collection, documents, sources)
        except CollectionGone as exc:
            raise not_found(f"collection {collection.name!r} was deleted", param="collection_name") from exc

    def delete_document(self, collection_name: str, document_id: str) -> None:
        collection = self.collection(collection_name)
        try:
            removed = self.vectors.delete_document(collection, document_id)
        except CollectionGone as exc:
            raise not_found(f"collection {collection_name!r} was deleted", param="collection_name") from exc
        if not removed:
            raise not_found(f"document {document_id!r} is not in collection {collection_name!r}",
                            param="document_id")

    def documents(self, collection_name: str, limit: int, offset: int) -> list[dict]:
        return self.vectors.documents(self.collection(collection_name), limit, offset)

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
                rankings.append(await asyncio.to_thread(self._dense, collections, query_vector, depth, metadata_filter))
        if search_type in ("sparse", "hybrid"):
            rankings.append(await asyncio.to_thread(self._sparse, collections, query, depth, metadata_filter))
        if len(rankings) == 2:
            ranked = reciprocal_rank_fusion([[i for i, _ in ranking] for ranking in rankings])[:top_k]
        else:
            ranked = rankings[0][:top_k]
        firsts = {ranking[0][0] for ranking in rankings if ranking}
        agreed = firsts.pop() if len(rankings) == 2 and all(rankings) and len(firsts) == 1 else None
        rows = await asyncio.to_thread(self.vectors.chunks, collections, [i for i, _ in ranked])
        hits = [Hit(rows[i], score) for i, score in ranked if i in rows]
        if rerank:
            keep = reranker_top_k or top_k
            try:
                hits = await self._rerank(query, hits, keep)
            except DependencyError as exc:
                log.warning("answering without reranking: %s", exc.message)
                warnings.append(f"{exc.message}; results are not reranked")
                hits = hits[:keep]
        return SearchResult(hits, warnings, unanimous=bool(hits) and hits[0].chunk.id == agreed)

    def _dense(self, collections: list[Collection], query: np.ndarray, k: int,
               metadata_filter: dict | None) -> list[tuple[int, float]]:
        for collection in collections:
            if collection.dimension is not None and collection.dimension != query.shape[0]:
                raise APIError(500, f"collection {collection.name!r} holds {collection.dimension}-d vectors but the "
                                    f"embedding model gives {query.shape[0]}-d; re-ingest with the same model")
        try:
            return self.vectors.dense_search(collections, query, k, metadata_filter)
        except CollectionGone as exc:
            raise _gone(collections, exc) from exc

    def _sparse(self, collections: list[Collection], query: str, k: int,
                metadata_filter: dict | None) -> list[tuple[int, float]]:
        try:
            return self.vectors.sparse_search(collections, query, k, metadata_filter)
        except CollectionGone as exc:
            raise _gone(collections, exc) from exc

    async def _rerank(self, query: str, hits: list[Hit], keep: int) -> list[Hit]:
        if self.reranker is None or not hits:
            return hits[:keep]
        ranked = await self.reranker.rank(query, [hit.chunk.content for hit in hits])
        return [Hit(hits[index].chunk, logit) for index, logit in ranked[:keep]]

    def integrity_problems(self) -> list[str]:
        return self.vectors.integrity_problems()

def _gone(collections: list[Collection], exc: CollectionGone) -> APIError:
    name = next((c.name for c in collections if c.id == exc.args[0]), "?")
    return not_found(f"collection {name!r} was deleted", param="collection_names")

