"""SQLite storage of collections, documents, chunks, their vectors (float16) and a BM25 index per collection.

SQLite is the source of truth and the commit point: a document is acknowledged only after the transaction
that writes it, its chunks, vectors and full-text rows has committed. Each collection carries a `version`
bumped by every write, so a saved vector index can tell whether it is behind.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL DEFAULT '',
    metadata TEXT NOT NULL DEFAULT '{}',
    dimension INTEGER,
    version INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS documents (
    collection_id INTEGER NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    name TEXT NOT NULL,
    metadata TEXT NOT NULL,
    num_chunks INTEGER NOT NULL,
    created REAL NOT NULL,
    fingerprint TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (collection_id, id)
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    collection_id INTEGER NOT NULL,
    document_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    content TEXT NOT NULL,
    metadata TEXT NOT NULL,
    vector BLOB NOT NULL,
    FOREIGN KEY (collection_id, document_id) REFERENCES documents(collection_id, id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(collection_id, document_id);
-- Where each document came from ('' for the JSON API): re-ingesting a file replaces what its path held.
CREATE TABLE IF NOT EXISTS document_sources (
    collection_id INTEGER NOT NULL,
    source TEXT NOT NULL,
    document_id TEXT NOT NULL,
    PRIMARY KEY (collection_id, source, document_id),
    FOREIGN KEY (collection_id, document_id) REFERENCES documents(collection_id, id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS sources_by_document ON document_sources(collection_id, document_id);
-- One row per top-level metadata key of each chunk, so a filter is an index lookup, not a collection scan.
CREATE TABLE IF NOT EXISTS chunk_metadata (
    chunk_id INTEGER NOT NULL REFERENCES chunks(id) ON DELETE CASCADE,
    collection_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    value
);
CREATE INDEX IF NOT EXISTS metadata_by_value ON chunk_metadata(collection_id, key, value);
CREATE INDEX IF NOT EXISTS metadata_by_chunk ON chunk_metadata(chunk_id);
"""
_SCHEMA_VERSION = 2
# The same SQL turns a chunk's metadata JSON into rows on insert and on migration: json_each gives scalars
# as SQL values (true -> 1) and arrays/objects as minified JSON text, which is how filter values are encoded.
_INDEX_METADATA = ("INSERT INTO chunk_metadata(chunk_id, collection_id, key, value) "
                   "SELECT ?, ?, key, value FROM json_each(?)")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_WORD = re.compile(r"\w+", re.UNICODE)
MAX_QUERY_TERMS = 64  # distinct words of a query that BM25 matches on (the first ones)


class CollectionGone(KeyError):
    """The collection was deleted (perhaps while this request was using it)."""


class NeedsEmbedding(Exception):
    """Documents that changed since the caller looked: it must chunk and embed them, then write again."""

    def __init__(self, document_ids: list[str]) -> None:
        super().__init__(f"{len(document_ids)} documents changed meanwhile")
        self.document_ids = document_ids


@dataclass(slots=True)
class Collection:
    id: int
    name: str
    description: str
    metadata: dict
    dimension: int | None
    version: int
    created: float


@dataclass(slots=True)
class NewChunk:
    content: str
    metadata: dict
    vector: np.ndarray


@dataclass(slots=True)
class NewDocument:
    """A document to write. `chunks` None: the caller expects it stored already with this fingerprint."""

    id: str
    name: str
    metadata: dict
    fingerprint: str
    source: str  # the file path it came from; '' for the JSON API
    chunks: list[NewChunk] | None


@dataclass(slots=True)
class WriteResult:
    statuses: dict[str, str]  # document id -> "ingested", "updated" or "unchanged"
    added_ids: list[int]
    added_vectors: np.ndarray
    removed_ids: list[int]
    replaced: list[str]  # documents removed because a re-ingested file no longer holds them
    version: int


@dataclass(slots=True)
class ChunkRow:
    id: int  # the row id, also the chunk's id in the vector index
    collection: str
    document_id: str
    document_name: str
    position: int
    content: str
    metadata: dict

    @property
    def chunk_id(self) -> str:
        return f"{self.document_id}:{self.position}"


def valid_collection_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def fts_query(text: str) -> str:
    """A full-text query that matches any of the first MAX_QUERY_TERMS distinct words of `text`.

    Each word is quoted, so user text cannot inject FTS syntax.
    """
    words: dict[str, None] = {}
    for match in _WORD.finditer(text):
        words.setdefault(match.group().lower())
        if len(words) == MAX_QUERY_TERMS:
            break
    return " OR ".join(f'"{w}"' for w in words)


def filter_value(value: object) -> object:
    """A filter value as chunk_metadata stores it (see _INDEX_METADATA)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        return float(value)  # past SQLite's 64-bit integers, JSON numbers are stored as REAL
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return json.dumps(value, separators=(",", ":"))


class Store:
    """All SQL lives here. One connection guarded by a lock; WAL lets readers of other processes proceed."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives power loss, not just a crash
        self._db.execute("PRAGMA foreign_keys=ON")
        self.lock = threading.RLock()
        self._migrate()

    def _migrate(self) -> None:
        """Create the schema, or bring a database written by an older version up to date."""
        with self.transaction() as db:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            existing = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "documents" in existing:
                columns = {r[1] for r in db.execute("PRAGMA table_info(documents)")}
                if "fingerprint" not in columns:
                    db.execute("ALTER TABLE documents ADD COLUMN fingerprint TEXT NOT NULL DEFAULT ''")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if version < _SCHEMA_VERSION and "chunks" in existing:
                db.execute("INSERT INTO chunk_metadata(chunk_id, collection_id, key, value) "
                           "SELECT c.id, c.collection_id, j.key, j.value FROM chunks c, json_each(c.metadata) j")
                db.execute("INSERT OR IGNORE INTO document_sources(collection_id, source, document_id) "
                           "SELECT collection_id, coalesce(json_extract(metadata, '$.path'), ''), id FROM documents")
            db.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def close(self) -> None:
        with self.lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # collections

    def create_collection(self, name: str, description: str = "", metadata: dict | None = None) -> Collection:
        with self.transaction() as db:
            db.execute("INSERT INTO collections(name, description, metadata, created) VALUES (?, ?, ?, ?)",
                       (name, description, json.dumps(metadata or {}), time.time()))
            collection = self._collection(name)
            assert collection is not None
            db.execute(f"CREATE VIRTUAL TABLE {_fts(collection.id)} USING fts5(content, tokenize='porter unicode61')")
        return collection

    def collection(self, name: str) -> Collection | None:
        with self.lock:
            return self._collection(name)

    def _collection(self, name: str) -> Collection | None:
        row = self._db.execute("SELECT * FROM collections WHERE name = ?", (name,)).fetchone()
        return _collection_from(row) if row else None

    def _require(self, collection_id: int) -> Collection:
        row = self._db.execute("SELECT * FROM collections WHERE id = ?", (collection_id,)).fetchone()
        if row is None:
            raise CollectionGone(collection_id)
        return _collection_from(row)

    def collections(self) -> list[Collection]:
        with self.lock:
            return [_collection_from(r) for r in self._db.execute("SELECT * FROM collections ORDER BY name")]

    def collection_stats(self, collection_id: int) -> tuple[int, int]:
        with self.lock:
            docs = self._db.execute("SELECT count(*) FROM documents WHERE collection_id = ?",
                                    (collection_id,)).fetchone()[0]
            chunks = self._db.execute("SELECT count(*) FROM chunks WHERE collection_id = ?",
                                      (collection_id,)).fetchone()[0]
        return docs, chunks

    def delete_collection(self, collection: Collection) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM chunk_metadata WHERE collection_id = ?", (collection.id,))
            db.execute("DELETE FROM document_sources WHERE collection_id = ?", (collection.id,))
            db.execute("DELETE FROM chunks WHERE collection_id = ?", (collection.id,))
            db.execute("DELETE FROM documents WHERE collection_id = ?", (collection.id,))
            db.execute("DELETE FROM collections WHERE id = ?", (collection.id,))
            db.execute(f"DROP TABLE IF EXISTS {_fts(collection.id)}")

    # documents

    def fingerprints(self, collection_id: int, ids: list[str]) -> dict[str, str]:
        """Stored fingerprint of each of these documents that exists."""
        found: dict[str, str] = {}
        with self.lock:
            for start in range(0, len(ids), 500):
                batch = ids[start:start + 500]
                marks = ",".join("?" * len(batch))
                found.update((r[0], r[1]) for r in self._db.execute(
                    f"SELECT id, fingerprint FROM documents WHERE collection_id = ? AND id IN ({marks})",
                    (collection_id, *batch)))
        return found

    def write_documents(self, collection_id: int, documents: list[NewDocument],
                        replace_sources: set[str]) -> WriteResult:
        """Upsert documents with their chunks in one transaction (the commit point of an ingestion).

        A document whose stored fingerprint equals the new one is left as it is ("unchanged"); one that
        differs has its chunks replaced ("updated"); a new one is inserted ("ingested"). For each path in
        `replace_sources`, documents that came from that path and are not among `documents` lose that
        source, and a document left with no source at all is deleted. Raises NeedsEmbedding, writing
        nothing, if a document given without chunks turns out to differ from what is stored.
        """
        added: list[int] = []
        vectors: list[np.ndarray] = []
        removed: list[int] = []
        statuses: dict[str, str] = {}
        with self.transaction() as db:
            current = self._require(collection_id)
            stale = [d.id for d in documents if d.chunks is None
                     and self._fingerprint(collection_id, d.id) != d.fingerprint]
            if stale:
                raise NeedsEmbedding(stale)
            dimension = current.dimension
            for document in documents:
                stored = self._fingerprint(collection_id, document.id)
                if stored == document.fingerprint:
                    statuses[document.id] = "unchanged"
                else:
                    assert document.chunks is not None
                    if stored is not None:
                        removed.extend(self._delete_chunks(collection_id, document.id))
                    dimension = self._write(collection_id, document, dimension, added, vectors)
                    statuses[document.id] = "updated" if stored is not None else "ingested"
                db.execute("INSERT OR IGNORE INTO document_sources(collection_id, source, document_id) "
                           "VALUES (?, ?, ?)", (collection_id, document.source, document.id))
            replaced = self._drop_replaced(collection_id, replace_sources, documents, removed)
            for document in documents:  # a new version of a file that was there before is an update
                if statuses[document.id] == "ingested" and replaced.get(document.source):
                    statuses[document.id] = "updated"
            version = self._bump(collection_id) if added or removed else current.version
        matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dimension or 0), np.float32)
        return WriteResult(statuses, added, matrix, removed, [i for ids in replaced.values() for i in ids], version)

    def _fingerprint(self, collection_id: int, document_id: str) -> str | None:
        row = self._db.execute("SELECT fingerprint FROM documents WHERE collection_id = ? AND id = ?",
                               (collection_id, document_id)).fetchone()
        return row[0] if row else None

    def _write(self, collection_id: int, document: NewDocument, dimension: int | None, row_ids: list[int],
               vectors: list[np.ndarray]) -> int | None:
        """Insert or overwrite the document row (its sources stay linked), then insert its chunks."""
        assert document.chunks is not None
        db = self._db
        db.execute("INSERT INTO documents(collection_id, id, name, metadata, num_chunks, created, fingerprint) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(collection_id, id) DO UPDATE SET name = excluded.name, "
                   "metadata = excluded.metadata, num_chunks = excluded.num_chunks, "
                   "fingerprint = excluded.fingerprint",
                   (collection_id, document.id, document.name, json.dumps(document.metadata), len(document.chunks),
                    time.time(), document.fingerprint))
        for position, chunk in enumerate(document.chunks):
            vector = np.asarray(chunk.vector, dtype=np.float16)
            if dimension is None:
                dimension = int(vector.shape[0])
                db.execute("UPDATE collections SET dimension = ? WHERE id = ?", (dimension, collection_id))
            if vector.shape != (dimension,):
                raise ValueError(f"vector of dimension {vector.shape} in a collection of dimension {dimension}")
            metadata = json.dumps(chunk.metadata)
            cursor = db.execute("INSERT INTO chunks(collection_id, document_id, position, content, metadata, vector) "
                                "VALUES (?, ?, ?, ?, ?, ?)", (collection_id, document.id, position, chunk.content,
                                                              metadata, vector.tobytes()))
            row_id = int(cursor.lastrowid or 0)
            db.execute(f"INSERT INTO {_fts(collection_id)}(rowid, content) VALUES (?, ?)", (row_id, chunk.content))
            db.execute(_INDEX_METADATA, (row_id, collection_id, metadata))
            row_ids.append(row_id)
            vectors.append(vector)
        return dimension

    def _drop_replaced(self, collection_id: int, sources: set[str], documents: list[NewDocument],
                       removed: list[int]) -> dict[str, list[str]]:
        """Unlink older documents of re-ingested paths; delete those that no source holds any more."""
        replaced: dict[str, list[str]] = {}
        for source in sorted(sources):
            keep = {d.id for d in documents if d.source == source}
            linked = [r[0] for r in self._db.execute(
                "SELECT document_id FROM document_sources WHERE collection_id = ? AND source = ?",
                (collection_id, source))]
            for document_id in linked:
                if document_id in keep:
                    continue
                self._db.execute("DELETE FROM document_sources WHERE collection_id = ? AND source = ? AND "
                                 "document_id = ?", (collection_id, source, document_id))
                others = self._db.execute("SELECT 1 FROM document_sources WHERE collection_id = ? AND "
                                          "document_id = ?", (collection_id, document_id)).fetchone()
                if others is None:
                    removed.extend(self._delete_document(collection_id, document_id))
                    replaced.setdefault(source, []).append(document_id)
        return replaced

    def delete_document(self, collection: Collection, document_id: str) -> tuple[list[int], int] | None:
        """Delete a document and its chunks; returns (removed chunk row ids, new version), None if absent."""
        with self.transaction():
            self._require(collection.id)
            if self._fingerprint(collection.id, document_id) is None:
                return None
            row_ids = self._delete_document(collection.id, document_id)
            version = self._bump(collection.id)
        return row_ids, version

    def _delete_document(self, collection_id: int, document_id: str) -> list[int]:
        """Delete a document, its chunks and its sources; returns the removed chunk row ids."""
        row_ids = self._delete_chunks(collection_id, document_id)
        self._db.execute("DELETE FROM documents WHERE collection_id = ? AND id = ?", (collection_id, document_id))
        return row_ids

    def _delete_chunks(self, collection_id: int, document_id: str) -> list[int]:
        db = self._db
        row_ids = [r[0] for r in db.execute("SELECT id FROM chunks WHERE collection_id = ? AND document_id = ?",
                                            (collection_id, document_id))]
        for start in range(0, len(row_ids), 500):
            batch = row_ids[start:start + 500]
            db.execute(f"DELETE FROM {_fts(collection_id)} WHERE rowid IN ({','.join('?' * len(batch))})", batch)
        db.execute("DELETE FROM chunks WHERE collection_id = ? AND document_id = ?", (collection_id, document_id))
        return row_ids

    def documents(self, collection_id: int, limit: int = 1000, offset: int = 0) -> list[dict]:
        with self.lock:
            rows = self._db.execute("SELECT id, name, metadata, num_chunks, created, fingerprint FROM documents "
                                    "WHERE collection_id = ? ORDER BY created, id LIMIT ? OFFSET ?",
                                    (collection_id, limit, offset)).fetchall()
        return [{"document_id": r["id"], "document_name": r["name"], "metadata": json.loads(r["metadata"]),
                 "num_chunks": r["num_chunks"], "created": r["created"], "fingerprint": r["fingerprint"]}
                for r in rows]

    def _bump(self, collection_id: int) -> int:
        self._db.execute("UPDATE collections SET version = version + 1 WHERE id = ?", (collection_id,))
        return int(self._db.execute("SELECT version FROM collections WHERE id = ?", (collection_id,)).fetchone()[0])

    # chunks

    def chunk_ids(self, collection_id: int) -> np.ndarray:
        """Row ids of every chunk of a collection, ascending."""
        with self.lock:
            rows = self._db.execute("SELECT id FROM chunks WHERE collection_id = ? ORDER BY id",
                                    (collection_id,)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def all_vectors(self, collection_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, float32 vectors) of every chunk in a collection, for rebuilding its index."""
        with self.lock:
            rows = self._db.execute("SELECT id, vector FROM chunks WHERE collection_id = ? ORDER BY id",
                                    (collection_id,)).fetchall()
        return _vectors_from(rows)

    def vectors(self, row_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, float32 vectors) of these chunks (those that exist), for catching an index up."""
        rows: list[sqlite3.Row] = []
        with self.lock:
            for start in range(0, len(row_ids), 500):
                batch = row_ids[start:start + 500]
                rows.extend(self._db.execute(f"SELECT id, vector FROM chunks WHERE id IN ({','.join('?' * len(batch))})"
                                             " ORDER BY id", batch))
        return _vectors_from(rows)

    def chunks(self, row_ids: list[int]) -> dict[int, ChunkRow]:
        found: dict[int, ChunkRow] = {}
        with self.lock:
            for start in range(0, len(row_ids), 500):
                batch = row_ids[start:start + 500]
                query = (f"SELECT c.id, c.document_id, c.position, c.content, c.metadata, d.name AS document_name, "
                         f"k.name AS collection FROM chunks c "
                         f"JOIN documents d ON d.collection_id = c.collection_id AND d.id = c.document_id "
                         f"JOIN collections k ON k.id = c.collection_id WHERE c.id IN ({','.join('?' * len(batch))})")
                for r in self._db.execute(query, batch):
                    found[r["id"]] = ChunkRow(r["id"], r["collection"], r["document_id"], r["document_name"],
                                              r["position"], r["content"], json.loads(r["metadata"]))
        return found

    def matching_chunk_ids(self, collection_id: int, metadata_filter: dict) -> np.ndarray:
        """Row ids of chunks whose metadata matches every condition (`value` or `{"$in": [values]}`).

        Each condition is an index lookup in chunk_metadata; the key is a bound parameter, never SQL or a
        JSON path, so any key (quotes, dots, brackets) is matched literally.
        """
        parts, params = [], []
        for key, condition in metadata_filter.items():
            values = condition["$in"] if isinstance(condition, dict) else [condition]
            parts.append(f"SELECT chunk_id FROM chunk_metadata WHERE collection_id = ? AND key = ? "
                         f"AND value IN ({','.join('?' * len(values))})")
            params.extend([collection_id, str(key), *(filter_value(v) for v in values)])
        with self.lock:
            self._require(collection_id)
            rows = self._db.execute(" INTERSECT ".join(parts) + " ORDER BY 1", params).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def bm25_search(self, collection_id: int, query: str, k: int,
                    allowed: np.ndarray | None = None) -> list[tuple[int, float]]:
        """(row id, score) of the best BM25 matches, best first; score is FTS5's bm25 negated (higher is better)."""
        match = fts_query(query)
        if not match or k <= 0:
            return []
        table = _fts(collection_id)
        sql = f"SELECT rowid, bm25({table}) AS s FROM {table} WHERE {table} MATCH ?"
        params: list[object] = [match]
        if allowed is not None:
            if len(allowed) == 0:
                return []
            # One JSON parameter, not one per id: a broad filter can allow more ids than SQLite takes variables.
            sql += " AND rowid IN (SELECT value FROM json_each(?))"
            params.append(json.dumps([int(i) for i in allowed]))
        sql += " ORDER BY s LIMIT ?"
        params.append(k)
        with self.lock:
            self._require(collection_id)  # under the lock: a concurrent delete has either happened or not
            return [(int(r[0]), -float(r[1])) for r in self._db.execute(sql, params)]

    def integrity_problems(self) -> list[str]:
        """Rows that should not exist: chunks without documents, full-text rows without chunks, etc."""
        problems = []
        with self.lock:
            orphans = self._db.execute("SELECT count(*) FROM chunks c LEFT JOIN documents d ON "
                                       "d.collection_id = c.collection_id AND d.id = c.document_id "
                                       "WHERE d.id IS NULL").fetchone()[0]
            if orphans:
                problems.append(f"{orphans} chunks without a document")
            short = self._db.execute("SELECT count(*) FROM documents d WHERE num_chunks != (SELECT count(*) FROM "
                                     "chunks c WHERE c.collection_id = d.collection_id AND c.document_id = d.id)"
                                     ).fetchone()[0]
            if short:
                problems.append(f"{short} documents whose chunk count is wrong")
            unsourced = self._db.execute("SELECT count(*) FROM documents d WHERE NOT EXISTS (SELECT 1 FROM "
                                         "document_sources s WHERE s.collection_id = d.collection_id AND "
                                         "s.document_id = d.id)").fetchone()[0]
            if unsourced:
                problems.append(f"{unsourced} documents with no source")
            unindexed = self._db.execute("SELECT count(*) FROM chunk_metadata m LEFT JOIN chunks c ON c.id = "
                                         "m.chunk_id WHERE c.id IS NULL").fetchone()[0]
            if unindexed:
                problems.append(f"{unindexed} metadata rows without a chunk")
            for collection in self.collections():
                fts = self._db.execute(f"SELECT count(*) FROM {_fts(collection.id)}").fetchone()[0]
                _, chunks = self.collection_stats(collection.id)
                if fts != chunks:
                    problems.append(f"collection {collection.name}: {fts} full-text rows for {chunks} chunks")
        return problems


def _fts(collection_id: int) -> str:
    return f"chunks_fts_{int(collection_id)}"


def _vectors_from(rows: list[sqlite3.Row]) -> tuple[np.ndarray, np.ndarray]:
    if not rows:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.stack([np.frombuffer(r[1], dtype=np.float16) for r in rows]).astype(np.float32)
    return ids, vectors


def _collection_from(row: sqlite3.Row) -> Collection:
    return Collection(row["id"], row["name"], row["description"], json.loads(row["metadata"]), row["dimension"],
                      row["version"], row["created"])
