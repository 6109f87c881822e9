"""The `local` vector store: SQLite (services/retriever/store.py) plus a FAISS index per collection in memory.

SQLite is the commit point and holds every vector; the indexes follow it. One writer at a time keeps SQLite
versions and the indexes in step. Index files are snapshots: a file behind SQLite is caught up (or rebuilt) at
start-up. Everything lives in one process, which is why this backend runs as a single replica.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from services.retriever.store import ChunkRow, Collection, CollectionGone, NewDocument, Store, WriteResult
from services.retriever.vector_index import TorchExactIndex, VectorIndex, faiss_gpu_available, torch_cuda_available
from services.retriever.vector_store import VectorStore

log = logging.getLogger(__name__)

AnyIndex = VectorIndex | TorchExactIndex


class LocalStore(VectorStore):
    kind = "local"

    def __init__(self, data_dir: Path, *, ann_threshold: int = 20_000, index_backend: str = "auto",
                 snapshot_changes: int = 1024) -> None:
        self.data_dir = data_dir
        self.ann_threshold = ann_threshold
        self.snapshot_changes = snapshot_changes
        self.index_backend = _choose_backend(index_backend)
        self.store = Store(data_dir / "retriever.sqlite3")
        self._indexes: dict[int, AnyIndex] = {}
        self._write_lock = threading.Lock()  # one writer at a time keeps SQLite versions and the index in step
        self._changes: dict[int, int] = {}  # vectors added or removed per collection since its index file was saved
        self._open_indexes()

    def close(self) -> None:
        try:
            self.save(force=True)
        finally:
            self.store.close()

    def details(self) -> dict:
        return {"vector_store": self.kind, "index_backend": self.index_backend}

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

    def save(self, force: bool = False) -> int:
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
        with self._write_lock:
            collection = self.store.create_collection(name, description, metadata)
            self._indexes[collection.id] = self._new_index(1)
        return collection

    def collection(self, name: str) -> Collection | None:
        return self.store.collection(name)

    def collections(self) -> list[Collection]:
        return self.store.collections()

    def describe(self, collection: Collection) -> dict:
        documents, chunks = self.store.collection_stats(collection.id)
        index = self._indexes.get(collection.id)
        described = {"documents": documents, "chunks": chunks, "index": index.kind if index is not None else None}
        if index is not None and index.kind == "ivf":
            described["nprobe"], described["measured_recall"] = index.nprobe, round(index.measured_recall, 4)
        return described

    def delete_collection(self, collection: Collection) -> None:
        with self._write_lock:
            self.store.delete_collection(collection)
            self._indexes.pop(collection.id, None)
            self._changes.pop(collection.id, None)
            self._index_path(collection).unlink(missing_ok=True)

    # documents

    def fingerprints(self, collection: Collection, ids: list[str]) -> dict[str, str]:
        return self.store.fingerprints(collection.id, ids)

    def write_documents(self, collection: Collection, documents: list[NewDocument],
                        replace_sources: set[str]) -> WriteResult:
        with self._write_lock:
            result = self.store.write_documents(collection.id, documents, replace_sources)
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

    def delete_document(self, collection: Collection, document_id: str) -> bool:
        with self._write_lock:
            removed = self.store.delete_document(collection, document_id)
            if removed is None:
                return False
            row_ids, version = removed
            index = self._indexes[collection.id]
            index.remove(np.asarray(row_ids, np.int64))
            index.version = version
            self._note_changes(collection.id, len(row_ids))
        return True

    def documents(self, collection: Collection, limit: int, offset: int) -> list[dict]:
        return self.store.documents(collection.id, limit, offset)

    # search

    def _allowed(self, collection: Collection, metadata_filter: dict | None) -> np.ndarray | None:
        return self.store.matching_chunk_ids(collection.id, metadata_filter) if metadata_filter else None

    def dense_search(self, collections: list[Collection], query: np.ndarray, k: int,
                     metadata_filter: dict | None) -> list[tuple[int, float]]:
        found: list[tuple[int, float]] = []
        for collection in collections:
            index = self._indexes.get(collection.id)
            if index is None:
                raise CollectionGone(collection.id)
            if index.size == 0:
                continue
            scores, ids = index.search(query[None, :], k, self._allowed(collection, metadata_filter))
            found.extend((int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0)
        return sorted(found, key=lambda pair: -pair[1])[:k]

    def sparse_search(self, collections: list[Collection], query: str, k: int,
                      metadata_filter: dict | None) -> list[tuple[int, float]]:
        found: list[tuple[int, float]] = []
        for collection in collections:
            found.extend(self.store.bm25_search(collection.id, query, k, self._allowed(collection, metadata_filter)))
        return sorted(found, key=lambda pair: -pair[1])[:k]

    def chunks(self, collections: list[Collection], ids: list[int]) -> dict[int, ChunkRow]:
        return self.store.chunks(ids)

    def integrity_problems(self) -> list[str]:
        """Anything dangling: rows without parents, or index entries that SQLite does not know (and the reverse)."""
        problems = self.store.integrity_problems()
        for collection in self.store.collections():
            ids = self.store.chunk_ids(collection.id)
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
