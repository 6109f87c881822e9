"""The `milvus` vector store: collections, documents, chunks, vectors and BM25 all in Milvus, nothing in the process.

Layout, for a collection NAME (Milvus names cannot hold '-' or '.', so they are spelled out):
  <prefix>collections     one row per collection: name, description, metadata, dimension, created
  <prefix>d_<NAME>        one row per document: id, name, metadata, fingerprint, the file paths it came from
  <prefix>c_<NAME>        one row per chunk: text, its metadata (document's + chunk's), the L2-normalised vector
                          (inner product = cosine, as the local store), and a BM25 sparse vector that Milvus
                          computes itself from `terms` (its built-in full-text search)
Every Milvus collection needs a vector field; the two bookkeeping ones carry a constant 2-d placeholder.

`terms` is the chunk text as Porter-stemmed lower-case words: the same words the local store's FTS5 porter
tokenizer indexes, and the same on milvus-lite (whose analyzer does not stem) as on a Milvus server.

Milvus has no multi-row transactions. A write stores the new chunks first, then the document row, then removes
the old chunks: a crash in between leaves extra chunks of the document (found by `integrity_problems`, removed
by the next write of that document), never a document without its chunks. Chunk ids are derived from
(collection, document, fingerprint, position), so every replica computes the same ids and a retried write is
idempotent.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import snowballstemmer
from pymilvus import DataType, Function, FunctionType, MilvusClient, MilvusException

from services.retriever.store import (
    ChunkRow,
    Collection,
    CollectionGone,
    NeedsEmbedding,
    NewDocument,
    WriteResult,
)
from services.retriever.vector_index import normalise
from services.retriever.vector_store import VectorStore

log = logging.getLogger(__name__)

_WORD = re.compile(r"\w+", re.UNICODE)
_PLACEHOLDER = [0.0, 0.0]
_MAX_TEXT = 65_535  # Milvus VARCHAR limit, in bytes
_PAGE = 1000  # rows per query page
_CHUNK_FIELDS = ["id", "document_id", "position", "content", "metadata"]


class MilvusUnavailable(RuntimeError):
    pass


class _QuietLiteIterator(logging.Filter):
    """milvus-lite cannot give query iterators a server timestamp; pymilvus warns on every page. Expected there."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "mvccTs" not in record.getMessage()


logging.getLogger("pymilvus.client.iterator.query_iterator").addFilter(_QuietLiteIterator())


def stemmed_terms(text: str, stemmer: Any = None) -> str:
    """Lower-case Porter stems of the words of `text`, space-separated (what BM25 indexes and matches)."""
    stemmer = stemmer or snowballstemmer.stemmer("porter")
    return " ".join(stemmer.stemWords([w.lower() for w in _WORD.findall(text)]))


def milvus_name(name: str) -> str:
    """A Milvus-safe spelling of a collection name ('_' doubled, '-' and '.' spelled out), one-to-one."""
    return name.replace("_", "__").replace("-", "_h").replace(".", "_d")


def chunk_key(collection: str, document_id: str, fingerprint: str, position: int) -> int:
    digest = hashlib.blake2b(f"{collection}\0{document_id}\0{fingerprint}\0{position}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big") & ((1 << 63) - 1)


def collection_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=6).digest(), "big")


def metadata_expression(metadata_filter: dict | None) -> str:
    """A Milvus filter for chunk metadata: every key must equal its value or one of `{"$in": [values]}`.

    Keys and strings are quoted by `string_literal`; `or` chains stand in for `in`, which Milvus does not take on a
    JSON path.
    """
    if not metadata_filter:
        return ""
    clauses = []
    for key, condition in metadata_filter.items():
        values = condition["$in"] if isinstance(condition, dict) else [condition]
        field = f"metadata[{string_literal(str(key))}]"
        options = [f"{field} == {_literal(v)}" for v in values]
        clauses.append("(" + " or ".join(options) + ")" if options else "false")
    return " and ".join(clauses)


def _literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(milvus_json(value))
    return string_literal(str(value))


def milvus_json(value: object) -> object:
    """`value` with integers past 64 bits as floats, which Milvus JSON holds (the local store does the same)."""
    if isinstance(value, dict):
        return {key: milvus_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [milvus_json(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        return float(value)
    return value


# Milvus string literals know \\ \" \n \r \t but not JSON's \uXXXX (milvus-lite refuses it), so everything else,
# non-ASCII and control characters included, is written as itself.
_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"})


def string_literal(value: str) -> str:
    return '"' + value.translate(_ESCAPES) + '"'


def _quoted_list(values: Iterable[str]) -> str:
    return "[" + ",".join(string_literal(v) for v in values) + "]"


class MilvusStore(VectorStore):
    """The vector-store interface over one Milvus database (a server URI, or a milvus-lite file)."""

    kind = "milvus"

    def __init__(self, uri: str, *, token: str = "", db_name: str = "", prefix: str = "rag_",
                 index_type: str = "HNSW", index_params: dict | None = None,
                 search_params: dict | None = None) -> None:
        self.uri, self.prefix = uri, prefix
        self.index_type = index_type
        self.index_params = index_params if index_params is not None else (
            {"M": 16, "efConstruction": 200} if index_type == "HNSW" else {})
        self.search_params = search_params or {}
        options: dict[str, Any] = {"uri": uri}
        if token:
            options["token"] = token
        if db_name:
            options["db_name"] = db_name
        try:
            self.client = MilvusClient(**options)
        except Exception as exc:  # pymilvus raises a variety; all mean "cannot reach it"
            raise MilvusUnavailable(f"cannot connect to Milvus at {uri}: {exc}") from exc
        self._stemmer = snowballstemmer.stemmer("porter")
        self._stem_lock = threading.Lock()  # snowball stemmers keep state between words
        self._create_lock = threading.Lock()  # the first write of a collection creates its chunk collection
        self._registry = f"{prefix}collections"
        self._ensure_registry()
        self._load_all()

    def close(self) -> None:
        self.client.close()

    def details(self) -> dict:
        return {"vector_store": self.kind, "milvus_uri": self.uri, "milvus_index": self.index_type}

    def save(self, force: bool = False) -> int:
        return 0  # Milvus persists every write itself

    @contextmanager
    def _gone_if_missing(self, collection: Collection) -> Iterator[None]:
        """A Milvus error on a collection that no longer exists (another replica deleted it) is CollectionGone."""
        try:
            yield
        except MilvusException as exc:
            if not self.client.has_collection(self._documents_of(collection.name)):
                raise CollectionGone(collection.id) from exc
            raise

    # collections

    def _ensure_registry(self) -> None:
        if self.client.has_collection(self._registry):
            return
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("name", DataType.VARCHAR, is_primary=True, max_length=256)
        schema.add_field("description", DataType.VARCHAR, max_length=_MAX_TEXT)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("dimension", DataType.INT64)
        schema.add_field("created", DataType.DOUBLE)
        schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=2)
        self._create(self._registry, schema, "placeholder")

    def _load_all(self) -> None:
        """Load every collection this store owns into memory: a Milvus that restarted (or a milvus-lite file
        opened again) keeps them released, and a released collection refuses searches."""
        names = [self._registry] + [n for c in self.collections()
                                    for n in (self._documents_of(c.name), self._chunks_of(c.name))]
        for name in names:
            if self.client.has_collection(name):
                self.client.load_collection(name)

    def wait_for_index(self, collection: Collection, timeout: float = 3600.0) -> None:
        """Flush a collection's chunks and wait until its vector index covers them (benchmarks, bulk loads)."""
        name = self._chunks_of(collection.name)
        self.client.flush(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.client.describe_index(name, "vector")
            if int(state.get("pending_index_rows", 0)) == 0 and state.get("state", "Finished") == "Finished":
                return
            time.sleep(1.0)
        raise TimeoutError(f"index of {collection.name} not built after {timeout:.0f}s")

    def _create(self, name: str, schema: Any, vector_field: str, *, index_type: str = "FLAT",
                metric: str = "L2", params: dict | None = None, sparse_field: str | None = None) -> None:
        index = self.client.prepare_index_params()
        index.add_index(vector_field, index_type=index_type, metric_type=metric, params=params or {})
        if sparse_field:
            index.add_index(sparse_field, index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
        self.client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")

    def _documents_of(self, name: str) -> str:
        return f"{self.prefix}d_{milvus_name(name)}"

    def _chunks_of(self, name: str) -> str:
        return f"{self.prefix}c_{milvus_name(name)}"

    def create_collection(self, name: str, description: str = "", metadata: dict | None = None) -> Collection:
        created = time.time()
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=1024)
        schema.add_field("name", DataType.VARCHAR, max_length=4096)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("fingerprint", DataType.VARCHAR, max_length=128)
        schema.add_field("sources", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=1024,
                         max_length=4096)
        schema.add_field("num_chunks", DataType.INT64)
        schema.add_field("created", DataType.DOUBLE)
        schema.add_field("placeholder", DataType.FLOAT_VECTOR, dim=2)
        self._create(self._documents_of(name), schema, "placeholder")
        self.client.upsert(self._registry, [{"name": name, "description": description,
                                             "metadata": milvus_json(metadata or {}),
                                             "dimension": 0, "created": created, "placeholder": _PLACEHOLDER}])
        return Collection(collection_key(name), name, description, metadata or {}, None, 0, created)

    def _create_chunks(self, name: str, dimension: int) -> None:
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("document_id", DataType.VARCHAR, max_length=1024)
        schema.add_field("fingerprint", DataType.VARCHAR, max_length=128)
        schema.add_field("position", DataType.INT64)
        schema.add_field("content", DataType.VARCHAR, max_length=_MAX_TEXT)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("terms", DataType.VARCHAR, max_length=_MAX_TEXT, enable_analyzer=True,
                         analyzer_params={"tokenizer": "standard", "filter": ["lowercase"]})
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_function(Function(name="bm25", function_type=FunctionType.BM25, input_field_names=["terms"],
                                     output_field_names=["sparse"]))
        try:
            self._create(self._chunks_of(name), schema, "vector", index_type=self.index_type, metric="IP",
                         params=self.index_params, sparse_field="sparse")
        except MilvusException:
            if not self.client.has_collection(self._chunks_of(name)):  # else another replica created it first
                raise
        self.client.upsert(self._registry, [{**self._registry_row(name), "dimension": dimension}])

    def _registry_row(self, name: str) -> dict:
        rows = self.client.query(self._registry, filter=f"name == {string_literal(name)}",
                                 output_fields=["name", "description", "metadata", "dimension", "created"])
        if not rows:
            raise KeyError(name)
        return {**rows[0], "placeholder": _PLACEHOLDER}

    def collection(self, name: str) -> Collection | None:
        rows = self.client.query(self._registry, filter=f"name == {string_literal(name)}",
                                 output_fields=["name", "description", "metadata", "dimension", "created"])
        return _collection_from(rows[0]) if rows else None

    def collections(self) -> list[Collection]:
        rows = self._all(self._registry, "", ["name", "description", "metadata", "dimension", "created"])
        return sorted((_collection_from(r) for r in rows), key=lambda c: c.name)

    def describe(self, collection: Collection) -> dict:
        with self._gone_if_missing(collection):
            documents = self._count(self._documents_of(collection.name))
            chunks = self._count(self._chunks_of(collection.name)) if collection.dimension else 0
        return {"documents": documents, "chunks": chunks,
                "index": self.index_type.lower() if collection.dimension else None}

    def delete_collection(self, collection: Collection) -> None:
        self.client.delete(self._registry, filter=f"name == {string_literal(collection.name)}")
        for name in (self._chunks_of(collection.name), self._documents_of(collection.name)):
            if self.client.has_collection(name):
                self.client.drop_collection(name)

    # documents

    def fingerprints(self, collection: Collection, ids: list[str]) -> dict[str, str]:
        with self._gone_if_missing(collection):
            return {i: row["fingerprint"] for i, row in self._document_rows(collection, ids).items()}

    def write_documents(self, collection: Collection, documents: list[NewDocument],
                        replace_sources: set[str]) -> WriteResult:
        """The local store's upsert (see Store.write_documents), in the order that keeps a crash harmless."""
        with self._gone_if_missing(collection):
            return self._write_documents(collection, documents, replace_sources)

    def _write_documents(self, collection: Collection, documents: list[NewDocument],
                         replace_sources: set[str]) -> WriteResult:
        stored = self._document_rows(collection, [d.id for d in documents])
        stale = [d.id for d in documents if d.chunks is None and stored.get(d.id, {}).get("fingerprint")
                 != d.fingerprint]
        if stale:
            raise NeedsEmbedding(stale)
        collection = self._with_dimension(collection, documents)
        statuses: dict[str, str] = {}
        chunk_rows: list[dict] = []
        document_rows: list[dict] = []
        now = time.time()
        for document in documents:
            previous = stored.get(document.id)
            sources = sorted(set(previous["sources"] if previous else []) | ({document.source} - {""}))
            if previous is not None and previous["fingerprint"] == document.fingerprint:
                statuses[document.id] = "unchanged"
                if sources != sorted(previous["sources"]):
                    document_rows.append({**previous, "sources": sources, "placeholder": _PLACEHOLDER})
                continue
            assert document.chunks is not None
            statuses[document.id] = "updated" if previous is not None else "ingested"
            chunk_rows.extend(self._chunk_rows(collection, document))
            document_rows.append({"id": document.id, "name": document.name, "metadata": milvus_json(document.metadata),
                                  "fingerprint": document.fingerprint, "sources": sources,
                                  "num_chunks": len(document.chunks),
                                  "created": previous["created"] if previous else now, "placeholder": _PLACEHOLDER})
        chunks_name = self._chunks_of(collection.name)
        for start in range(0, len(chunk_rows), _PAGE):
            self.client.upsert(chunks_name, chunk_rows[start:start + _PAGE])
        if document_rows:
            self.client.upsert(self._documents_of(collection.name), document_rows)
        for document in documents:
            if statuses[document.id] == "updated":
                self._delete_chunks(collection, document.id, keep_fingerprint=document.fingerprint)
        replaced = self._drop_replaced(collection, replace_sources, documents)
        for document in documents:  # a new version of a file that was there before is an update
            if statuses[document.id] == "ingested" and replaced.get(document.source):
                statuses[document.id] = "updated"
        return WriteResult(statuses, [r["id"] for r in chunk_rows], np.zeros((0, 0), np.float32), [],
                           [i for ids in replaced.values() for i in ids], 0)

    def _with_dimension(self, collection: Collection, documents: list[NewDocument]) -> Collection:
        vectors = [c.vector for d in documents for c in d.chunks or []]
        if not vectors:
            return collection
        dimension = int(np.asarray(vectors[0]).shape[0])
        with self._create_lock:
            current = self.collection(collection.name)
            if current is None:
                raise CollectionGone(collection.id)
            if current.dimension is None:
                self._create_chunks(collection.name, dimension)
                current.dimension = dimension
        for vector in vectors:
            if np.asarray(vector).shape != (current.dimension,):
                raise ValueError(f"vector of dimension {np.asarray(vector).shape} in a collection of dimension "
                                 f"{current.dimension}")
        return current

    def _chunk_rows(self, collection: Collection, document: NewDocument) -> list[dict]:
        assert document.chunks is not None
        vectors = normalise(np.stack([np.asarray(c.vector, np.float32) for c in document.chunks]))
        with self._stem_lock:
            terms = [stemmed_terms(c.content, self._stemmer) for c in document.chunks]
        return [{"id": chunk_key(collection.name, document.id, document.fingerprint, position),
                 "document_id": document.id, "fingerprint": document.fingerprint, "position": position,
                 "content": chunk.content, "metadata": milvus_json(chunk.metadata),
                 "terms": terms[position][:_MAX_TEXT // 4],
                 "vector": vectors[position].tolist()}
                for position, chunk in enumerate(document.chunks)]

    def _document_rows(self, collection: Collection, ids: list[str]) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for start in range(0, len(ids), _PAGE):
            batch = ids[start:start + _PAGE]
            rows = self.client.query(self._documents_of(collection.name), filter=f"id in {_quoted_list(batch)}",
                                     output_fields=["id", "name", "metadata", "fingerprint", "sources",
                                                    "num_chunks", "created"])
            found.update((r["id"], dict(r)) for r in rows)
        return found

    def _delete_chunks(self, collection: Collection, document_id: str, keep_fingerprint: str | None = None) -> None:
        if not collection.dimension:
            return
        condition = f"document_id == {string_literal(document_id)}"
        if keep_fingerprint is not None:
            condition += f" and fingerprint != {string_literal(keep_fingerprint)}"
        self.client.delete(self._chunks_of(collection.name), filter=condition)

    def _drop_replaced(self, collection: Collection, sources: set[str],
                       documents: list[NewDocument]) -> dict[str, list[str]]:
        replaced: dict[str, list[str]] = {}
        for source in sorted(sources - {""}):
            keep = {d.id for d in documents if d.source == source}
            linked = self._all(self._documents_of(collection.name),
                               f"array_contains(sources, {string_literal(source)})",
                               ["id", "name", "metadata", "fingerprint", "sources", "num_chunks", "created"])
            for row in linked:
                if row["id"] in keep:
                    continue
                remaining = [s for s in row["sources"] if s != source]
                if remaining:
                    self.client.upsert(self._documents_of(collection.name),
                                       [{**row, "sources": remaining, "placeholder": _PLACEHOLDER}])
                else:
                    self._delete_document(collection, row["id"])
                    replaced.setdefault(source, []).append(row["id"])
        return replaced

    def delete_document(self, collection: Collection, document_id: str) -> bool:
        with self._gone_if_missing(collection):
            if not self._document_rows(collection, [document_id]):
                return False
            self._delete_document(collection, document_id)
        return True

    def _delete_document(self, collection: Collection, document_id: str) -> None:
        # The document row goes first: a crash after it leaves orphan chunks, which no search returns.
        self.client.delete(self._documents_of(collection.name), filter=f"id == {string_literal(document_id)}")
        self._delete_chunks(collection, document_id)

    def documents(self, collection: Collection, limit: int = 1000, offset: int = 0) -> list[dict]:
        with self._gone_if_missing(collection):
            rows = self._all(self._documents_of(collection.name), "",
                             ["id", "name", "metadata", "num_chunks", "created", "fingerprint"])
        rows.sort(key=lambda r: (r["created"], r["id"]))
        return [{"document_id": r["id"], "document_name": r["name"], "metadata": r["metadata"],
                 "num_chunks": r["num_chunks"], "created": r["created"], "fingerprint": r["fingerprint"]}
                for r in rows[offset:offset + limit]]

    # search

    def dense_search(self, collections: list[Collection], query: np.ndarray, k: int,
                     metadata_filter: dict | None) -> list[tuple[int, float]]:
        vector = normalise(np.asarray(query, np.float32)[None, :])[0].tolist()
        params = {"metric_type": "IP", "params": {**self._default_search_params(k), **self.search_params}}
        return self._search(collections, [vector], "vector", k, metadata_filter, params, sign=1.0)

    def sparse_search(self, collections: list[Collection], query: str, k: int,
                      metadata_filter: dict | None) -> list[tuple[int, float]]:
        with self._stem_lock:
            terms = stemmed_terms(query, self._stemmer)
        if not terms:
            return []
        # Milvus servers report BM25 as a positive score, milvus-lite as its negation; both rank best first.
        return self._search(collections, [terms], "sparse", k, metadata_filter, {"metric_type": "BM25"}, sign=0.0)

    def _default_search_params(self, k: int) -> dict:
        if self.index_type.startswith("HNSW"):
            return {"ef": max(64, k)}
        if self.index_type.startswith("IVF"):
            return {"nprobe": 16}
        return {}

    def _search(self, collections: list[Collection], data: list, field: str, k: int, metadata_filter: dict | None,
                params: dict, *, sign: float) -> list[tuple[int, float]]:
        found: list[tuple[int, float]] = []
        expression = metadata_expression(metadata_filter)
        for collection in collections:
            if not collection.dimension or k <= 0:
                continue
            with self._gone_if_missing(collection):
                results = self.client.search(self._chunks_of(collection.name), data=data, anns_field=field,
                                             limit=k, filter=expression, search_params=params, output_fields=[])
            for hit in results[0]:
                distance = float(hit["distance"])
                found.append((int(hit["id"]), distance if sign else abs(distance)))
        return sorted(found, key=lambda pair: -pair[1])[:k]

    def chunks(self, collections: list[Collection], ids: list[int]) -> dict[int, ChunkRow]:
        found: dict[int, ChunkRow] = {}
        for collection in collections:
            wanted = [i for i in ids if i not in found]
            if not wanted or not collection.dimension:
                continue
            with self._gone_if_missing(collection):
                rows = self.client.query(self._chunks_of(collection.name), filter=f"id in {wanted}",
                                         output_fields=_CHUNK_FIELDS)
                documents = self._document_rows(collection, list({r["document_id"] for r in rows}))
            names = {document_id: row["name"] for document_id, row in documents.items()}
            for r in rows:
                if r["document_id"] in names:  # chunks of a half-deleted document are not served
                    found[int(r["id"])] = ChunkRow(int(r["id"]), collection.name, r["document_id"],
                                                   names[r["document_id"]], int(r["position"]), r["content"],
                                                   r["metadata"])
        return found

    def integrity_problems(self) -> list[str]:
        """Chunks whose document row is missing or whose fingerprint is not the document's (an interrupted write)."""
        problems = []
        for collection in self.collections():
            if not collection.dimension:
                continue
            documents = {r["id"]: r["fingerprint"] for r in self._all(self._documents_of(collection.name), "",
                                                                     ["id", "fingerprint"])}
            chunks = self._all(self._chunks_of(collection.name), "", ["id", "document_id", "fingerprint"])
            stray = [c for c in chunks if documents.get(c["document_id"]) != c["fingerprint"]]
            if stray:
                problems.append(f"collection {collection.name}: {len(stray)} chunks without their document")
        return problems

    # helpers

    def _count(self, name: str) -> int:
        if not self.client.has_collection(name):
            return 0
        return int(self.client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])

    def _all(self, name: str, expression: str, fields: list[str]) -> list[dict]:
        rows: list[dict] = []
        iterator = self.client.query_iterator(name, batch_size=_PAGE, filter=expression, output_fields=fields)
        try:
            while batch := iterator.next():
                rows.extend(dict(r) for r in batch)
        finally:
            iterator.close()
        return rows


def _collection_from(row: dict) -> Collection:
    dimension = int(row["dimension"]) or None
    return Collection(collection_key(row["name"]), row["name"], row["description"], row["metadata"] or {},
                      dimension, 0, float(row["created"]))
