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
"""

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_WORD = re.compile(r"\w+", re.UNICODE)


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
    id: str
    name: str
    metadata: dict
    chunks: list[NewChunk]


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
    return bool(_NAME.match(name))


def fts_query(text: str) -> str:
    """A full-text query that matches any word of `text` (quoted, so user text cannot inject FTS syntax)."""
    words = dict.fromkeys(w.lower() for w in _WORD.findall(text))
    return " OR ".join(f'"{w}"' for w in words)


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
        self._db.executescript(_SCHEMA)
        self.lock = threading.RLock()

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
            db.execute("DELETE FROM chunks WHERE collection_id = ?", (collection.id,))
            db.execute("DELETE FROM documents WHERE collection_id = ?", (collection.id,))
            db.execute("DELETE FROM collections WHERE id = ?", (collection.id,))
            db.execute(f"DROP TABLE IF EXISTS {_fts(collection.id)}")

    # documents

    def existing_document_ids(self, collection_id: int, ids: list[str]) -> set[str]:
        found: set[str] = set()
        with self.lock:
            for start in range(0, len(ids), 500):
                batch = ids[start:start + 500]
                marks = ",".join("?" * len(batch))
                found.update(r[0] for r in self._db.execute(
                    f"SELECT id FROM documents WHERE collection_id = ? AND id IN ({marks})", (collection_id, *batch)))
        return found

    def add_documents(self, collection: Collection, documents: list[NewDocument]) -> tuple[list[int], np.ndarray, int]:
        """Write documents with their chunks in one transaction; returns (chunk row ids, vectors, new version).

        Documents already present (same id) are left untouched, which makes re-ingestion a no-op.
        """
        row_ids: list[int] = []
        vectors: list[np.ndarray] = []
        with self.transaction() as db:
            current = self._collection(collection.name)
            if current is None:
                raise KeyError(collection.name)
            dimension = current.dimension
            for document in documents:
                exists = db.execute("SELECT 1 FROM documents WHERE collection_id = ? AND id = ?",
                                    (current.id, document.id)).fetchone()
                if exists:
                    continue
                db.execute("INSERT INTO documents(collection_id, id, name, metadata, num_chunks, created) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (current.id, document.id, document.name,
                                                        json.dumps(document.metadata), len(document.chunks),
                                                        time.time()))
                for position, chunk in enumerate(document.chunks):
                    vector = np.asarray(chunk.vector, dtype=np.float16)
                    if dimension is None:
                        dimension = int(vector.shape[0])
                        db.execute("UPDATE collections SET dimension = ? WHERE id = ?", (dimension, current.id))
                    if vector.shape != (dimension,):
                        raise ValueError(f"vector of dimension {vector.shape} in a collection of dimension {dimension}")
                    cursor = db.execute("INSERT INTO chunks(collection_id, document_id, position, content, metadata, "
                                        "vector) VALUES (?, ?, ?, ?, ?, ?)",
                                        (current.id, document.id, position, chunk.content,
                                         json.dumps(chunk.metadata), vector.tobytes()))
                    row_id = int(cursor.lastrowid or 0)
                    db.execute(f"INSERT INTO {_fts(current.id)}(rowid, content) VALUES (?, ?)",
                               (row_id, chunk.content))
                    row_ids.append(row_id)
                    vectors.append(vector)
            version = self._bump(current.id) if row_ids else current.version
        matrix = np.stack(vectors).astype(np.float32) if vectors else np.zeros((0, dimension or 0), np.float32)
        return row_ids, matrix, version

    def delete_document(self, collection: Collection, document_id: str) -> tuple[list[int], int] | None:
        """Delete a document and its chunks; returns (removed chunk row ids, new version), None if absent."""
        with self.transaction() as db:
            found = db.execute("SELECT 1 FROM documents WHERE collection_id = ? AND id = ?",
                               (collection.id, document_id)).fetchone()
            if not found:
                return None
            row_ids = [r[0] for r in db.execute("SELECT id FROM chunks WHERE collection_id = ? AND document_id = ?",
                                                (collection.id, document_id))]
            for start in range(0, len(row_ids), 500):
                batch = row_ids[start:start + 500]
                db.execute(f"DELETE FROM {_fts(collection.id)} WHERE rowid IN ({','.join('?' * len(batch))})", batch)
            db.execute("DELETE FROM chunks WHERE collection_id = ? AND document_id = ?", (collection.id, document_id))
            db.execute("DELETE FROM documents WHERE collection_id = ? AND id = ?", (collection.id, document_id))
            version = self._bump(collection.id)
        return row_ids, version

    def documents(self, collection_id: int, limit: int = 1000, offset: int = 0) -> list[dict]:
        with self.lock:
            rows = self._db.execute("SELECT id, name, metadata, num_chunks, created FROM documents "
                                    "WHERE collection_id = ? ORDER BY created, id LIMIT ? OFFSET ?",
                                    (collection_id, limit, offset)).fetchall()
        return [{"document_id": r["id"], "document_name": r["name"], "metadata": json.loads(r["metadata"]),
                 "num_chunks": r["num_chunks"], "created": r["created"]} for r in rows]

    def _bump(self, collection_id: int) -> int:
        self._db.execute("UPDATE collections SET version = version + 1 WHERE id = ?", (collection_id,))
        return int(self._db.execute("SELECT version FROM collections WHERE id = ?", (collection_id,)).fetchone()[0])

    # chunks

    def all_vectors(self, collection_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, float32 vectors) of every chunk in a collection, for rebuilding its index."""
        with self.lock:
            rows = self._db.execute("SELECT id, vector FROM chunks WHERE collection_id = ? ORDER BY id",
                                    (collection_id,)).fetchall()
        if not rows:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        vectors = np.stack([np.frombuffer(r[1], dtype=np.float16) for r in rows]).astype(np.float32)
        return ids, vectors

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
        """Row ids of chunks whose metadata matches every condition (`value` or `{"$in": [values]}`)."""
        clauses, params = ["collection_id = ?"], [collection_id]
        for key, condition in metadata_filter.items():
            path = "$." + json.dumps(str(key))
            values = condition["$in"] if isinstance(condition, dict) else [condition]
            clauses.append(f"json_extract(metadata, ?) IN ({','.join('?' * len(values))})")
            params.extend([path, *(_sql_value(v) for v in values)])
        with self.lock:
            rows = self._db.execute(f"SELECT id FROM chunks WHERE {' AND '.join(clauses)}", params).fetchall()
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
            for collection in self.collections():
                fts = self._db.execute(f"SELECT count(*) FROM {_fts(collection.id)}").fetchone()[0]
                _, chunks = self.collection_stats(collection.id)
                if fts != chunks:
                    problems.append(f"collection {collection.name}: {fts} full-text rows for {chunks} chunks")
        return problems


def _fts(collection_id: int) -> str:
    return f"chunks_fts_{int(collection_id)}"


def _sql_value(value: object) -> object:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return json.dumps(value)


def _collection_from(row: sqlite3.Row) -> Collection:
    return Collection(row["id"], row["name"], row["description"], json.loads(row["metadata"]), row["dimension"],
                      row["version"], row["created"])
