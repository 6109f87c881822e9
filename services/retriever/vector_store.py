"""The one interface between the knowledge base and where its corpus lives, and the start-up choice of backend.

Two implementations, picked once by `RETRIEVER_VECTOR_STORE`:
  local   services/retriever/local_store.py   SQLite + in-process FAISS under RETRIEVER_DATA_DIR (one process)
  milvus  services/retriever/milvus_store.py  everything in Milvus (RETRIEVER_MILVUS_URI): replicas hold no state

Chunk ids are ints, unique across the collections of one store; scores are higher-is-better (dense: cosine,
sparse: BM25). A collection deleted while a call uses it raises `CollectionGone`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np

from services.retriever.settings import RetrieverSettings
from services.retriever.store import ChunkRow, Collection, NewDocument, WriteResult


class VectorStore(ABC):
    kind: str

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def details(self) -> dict:
        """What the readiness endpoint shows about the backend."""

    # collections

    @abstractmethod
    def create_collection(self, name: str, description: str = "", metadata: dict | None = None) -> Collection: ...

    @abstractmethod
    def collection(self, name: str) -> Collection | None: ...

    @abstractmethod
    def collections(self) -> list[Collection]: ...

    @abstractmethod
    def describe(self, collection: Collection) -> dict:
        """Counts and index facts: {documents, chunks, index, ...}."""

    @abstractmethod
    def delete_collection(self, collection: Collection) -> None: ...

    # documents

    @abstractmethod
    def fingerprints(self, collection: Collection, ids: list[str]) -> dict[str, str]: ...

    @abstractmethod
    def write_documents(self, collection: Collection, documents: list[NewDocument],
                        replace_sources: set[str]) -> WriteResult:
        """Upsert by fingerprint; re-ingested sources drop the documents they no longer hold (Store.write_documents).
        Raises NeedsEmbedding, writing nothing, if a document given without chunks changed meanwhile."""

    @abstractmethod
    def delete_document(self, collection: Collection, document_id: str) -> bool:
        """False if the document is not there."""

    @abstractmethod
    def documents(self, collection: Collection, limit: int, offset: int) -> list[dict]: ...

    # search

    @abstractmethod
    def dense_search(self, collections: list[Collection], query: np.ndarray, k: int,
                     metadata_filter: dict | None) -> list[tuple[int, float]]:
        """(chunk id, cosine) of the k nearest chunks over all `collections`, best first."""

    @abstractmethod
    def sparse_search(self, collections: list[Collection], query: str, k: int,
                      metadata_filter: dict | None) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) of the k best keyword matches, best first."""

    @abstractmethod
    def chunks(self, collections: list[Collection], ids: list[int]) -> dict[int, ChunkRow]: ...

    # upkeep

    @abstractmethod
    def save(self, force: bool = False) -> int:
        """Persist what is only in memory (local index snapshots); returns how many things were written."""

    @abstractmethod
    def integrity_problems(self) -> list[str]: ...


def _local(settings: RetrieverSettings, data_dir: Path, index_backend: str) -> VectorStore:
    from services.retriever.local_store import LocalStore

    return LocalStore(data_dir, ann_threshold=settings.ann_threshold, index_backend=index_backend,
                      snapshot_changes=settings.index_snapshot_changes)


def _milvus(settings: RetrieverSettings, data_dir: Path, index_backend: str) -> VectorStore:
    from services.retriever.milvus_store import MilvusStore

    uri = settings.milvus_uri or str(data_dir / "milvus.db")  # no URI: an embedded milvus-lite file
    if "://" not in uri:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return MilvusStore(uri, token=settings.milvus_token, db_name=settings.milvus_db, prefix=settings.milvus_prefix,
                       index_type=settings.milvus_index_type,
                       index_params=json.loads(settings.milvus_index_params) if settings.milvus_index_params else None,
                       search_params=json.loads(settings.milvus_search_params or "{}"))


BACKENDS: dict[str, Callable[[RetrieverSettings, Path, str], VectorStore]] = {"local": _local, "milvus": _milvus}


def open_vector_store(settings: RetrieverSettings, index_backend: str = "auto") -> VectorStore:
    return BACKENDS[settings.vector_store](settings, settings.data_dir, index_backend)
