"""A vector index per collection: inner product over L2-normalised vectors, ids are chunk row ids.

Exact search (FAISS IndexFlatIP in an IDMap) for small collections; past `ann_threshold` vectors an IVF
index (trained on the collection, supports delete by id) replaces it. FAISS runs on the GPU when faiss-gpu
and CUDA are there; with CUDA but no faiss-gpu an exact torch search on the GPU serves instead.
Saved atomically (temp file, fsync, rename) with the SQLite version it reflects, so start-up can tell if it is behind.

Writes race with searches in FAISS (and GPU FAISS is not safe even under concurrent searches), so a
`VectorIndex` guards itself with a readers-writer lock; `TorchExactIndex` swaps immutable snapshots instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
from pathlib import Path

import faiss
import numpy as np

from services.retriever.rwlock import ReadWriteLock

log = logging.getLogger(__name__)
_MAGIC = b"RVIX1"
TARGET_RECALL = 0.95
RECALL_AT = 10
_HELD_OUT = 256  # vectors kept out of the index while nprobe is measured, then added


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def faiss_gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class VectorIndex:
    """FAISS index of one collection. `kind` is "flat" (exact) or "ivf" (approximate)."""

    def __init__(self, dimension: int, *, ann_threshold: int = 20_000, use_gpu: bool | None = None) -> None:
        self.dimension = dimension
        self.ann_threshold = ann_threshold
        self.version = 0
        self.use_gpu = faiss_gpu_available() if use_gpu is None else use_gpu
        self.kind = "flat"
        self.trained_on = 0
        self.nprobe = 0  # IVF lists searched per query, chosen at build time for recall >= TARGET_RECALL
        self.measured_recall = 1.0
        self._index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self._gpu_copy: faiss.Index | None = None
        self._lock = ReadWriteLock()

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors; the caller rebuilds from its stored vectors when `needs_rebuild()` says so."""
        if len(ids) == 0:
            return
        assert vectors.shape == (len(ids), self.dimension), (vectors.shape, self.dimension)
        vectors = normalise(vectors)
        with self._lock.write():
            self._index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
            self._gpu_copy = None

    def needs_rebuild(self) -> bool:
        if self.size <= self.ann_threshold:
            return False
        # Retrain when the collection has grown well past what the coarse quantizer was trained on.
        return self.kind == "flat" or self.size > 4 * self.trained_on

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the contents with exactly these vectors: exact below the threshold, IVF above it."""
        vectors = normalise(vectors) if len(ids) else np.zeros((0, self.dimension), np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        nprobe, recall = 0, 1.0
        if len(ids) <= self.ann_threshold:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))
            kind, trained_on = "flat", 0
            if len(ids):
                index.add_with_ids(vectors, ids)
        else:
            nlist = max(16, int(4 * math.sqrt(len(ids))))
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dimension), self.dimension, nlist,
                                     faiss.METRIC_INNER_PRODUCT)
            log.info("training IVF index on %d vectors (nlist=%d)", len(ids), nlist)
            ivf.train(vectors)
            index = faiss.IndexIDMap2(ivf)
            nprobe, recall = _add_and_tune_nprobe(index, ivf, ids, vectors)
            ivf.nprobe = nprobe  # set on the index, so unfiltered search needs no params (GPU-able)
            log.info("IVF index over %d vectors: nprobe %d of %d lists gives recall@%d %.3f on held-out vectors",
                     len(ids), nprobe, nlist, RECALL_AT, recall)
            kind, trained_on = "ivf", len(ids)
        with self._lock.write():
            self._index, self._gpu_copy = index, None
            self.kind, self.trained_on, self.nprobe, self.measured_recall = kind, trained_on, nprobe, recall

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        selector = faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))
        with self._lock.write():
            removed = int(self._index.remove_ids(selector))
            self._gpu_copy = None
        return removed

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of shape (len(queries), k), best first; missing hits have id -1."""
        queries = normalise(np.atleast_2d(queries))
        selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64)) if allowed is not None else None
        # GPU FAISS is not safe under concurrent searches either: there a search takes the lock alone.
        with self._lock.write() if self.use_gpu else self._lock.read():
            size = self.size
            k = max(1, min(k, size)) if size else 1
            if size == 0 or (allowed is not None and len(allowed) == 0):
                return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
            if selector is None:
                return self._searchable().search(queries, k)
            if self.kind != "ivf":
                return self._index.search(queries, k, params=faiss.SearchParameters(sel=selector))
            # A filter that keeps 1/n of the vectors leaves ~1/n of each probed list: probe n times as many.
            nlist = int(faiss.extract_index_ivf(self._index).nlist)
            nprobe = min(nlist, self.nprobe * max(1, math.ceil(size / max(1, len(allowed)))))  # type: ignore[arg-type]
            return self._index.search(queries, k, params=faiss.SearchParametersIVF(sel=selector, nprobe=nprobe))

    def ids(self) -> np.ndarray:
        with self._lock.read():
            return faiss.vector_to_array(faiss.downcast_index(self._index).id_map).astype(np.int64)

    def _searchable(self) -> faiss.Index:
        if not self.use_gpu:
            return self._index
        if self._gpu_copy is None:
            self._gpu_copy = faiss.index_cpu_to_gpu(_gpu_resources(), 0, self._index)
        return self._gpu_copy

    # persistence

    def save(self, path: Path) -> None:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        header = json.dumps({"version": self.version, "kind": self.kind, "trained_on": self.trained_on,
                             "dimension": self.dimension, "nprobe": self.nprobe,
                             "measured_recall": self.measured_recall}).encode()
        with self._lock.read():
            body = faiss.serialize_index(self._index).tobytes()
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "wb") as handle:
            handle.write(_MAGIC + struct.pack("<I", len(header)) + header + body)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    @classmethod
    def load(cls, path: Path, *, ann_threshold: int, use_gpu: bool | None = None) -> VectorIndex:
        data = path.read_bytes()
        if not data.startswith(_MAGIC):
            raise ValueError(f"{path} is not a vector index file")
        (length,) = struct.unpack("<I", data[len(_MAGIC):len(_MAGIC) + 4])
        start = len(_MAGIC) + 4
        header = json.loads(data[start:start + length])
        index = cls(header["dimension"], ann_threshold=ann_threshold, use_gpu=use_gpu)
        index._index = faiss.deserialize_index(np.frombuffer(data[start + length:], dtype=np.uint8))
        index.version, index.kind, index.trained_on = header["version"], header["kind"], header["trained_on"]
        if index.kind == "ivf":
            ivf = faiss.extract_index_ivf(index._index)
            # Files written before nprobe was measured: the old fixed quarter of the lists.
            index.nprobe = int(header.get("nprobe") or max(16, int(ivf.nlist) // 4))
            index.measured_recall = float(header.get("measured_recall", 1.0))
            ivf.nprobe = index.nprobe
        return index


class TorchExactIndex:
    """Exact inner-product search with torch, for CUDA machines without faiss-gpu (also runs on CPU).

    Copy-on-write: ids and vectors live together in one tuple that a write replaces whole, so a search
    reads one consistent snapshot without a lock (writes are serialised by the caller).
    """

    kind = "torch-exact"
    nprobe = 0
    measured_recall = 1.0

    def __init__(self, dimension: int, device: str = "cuda") -> None:
        import torch

        self._torch = torch
        self.dimension, self.device, self.version = dimension, device, 0
        self._data = (torch.zeros(0, dtype=torch.int64, device=device),
                      torch.zeros((0, dimension), dtype=torch.float16 if device != "cpu" else torch.float32,
                                  device=device))

    @property
    def size(self) -> int:
        return int(self._data[0].shape[0])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        torch = self._torch
        old_ids, old_vectors = self._data
        new = torch.from_numpy(normalise(vectors)).to(self.device, old_vectors.dtype)
        new_ids = torch.from_numpy(np.asarray(ids, np.int64)).to(self.device)
        self._data = (torch.cat([old_ids, new_ids]), torch.cat([old_vectors, new]))

    def needs_rebuild(self) -> bool:
        return False

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        old_ids, old_vectors = self._data
        self._data = (old_ids[:0], old_vectors[:0])
        if len(ids):
            self.add(ids, vectors)

    def remove(self, ids: np.ndarray) -> int:
        torch = self._torch
        old_ids, old_vectors = self._data
        drop = torch.isin(old_ids, torch.from_numpy(np.asarray(ids, np.int64)).to(self.device))
        self._data = (old_ids[~drop], old_vectors[~drop])
        return int(drop.sum())

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        ids, vectors = self._data
        if ids.shape[0] == 0:
            return np.full((len(queries), 1), -np.inf, np.float32), np.full((len(queries), 1), -1, np.int64)
        queries = torch.from_numpy(normalise(np.atleast_2d(queries))).to(self.device, vectors.dtype)
        scores = (queries @ vectors.T).float()
        if allowed is not None:
            keep = torch.isin(ids, torch.from_numpy(np.asarray(allowed, np.int64)).to(self.device))
            scores[:, ~keep] = -torch.inf
        top = torch.topk(scores, max(1, min(k, int(ids.shape[0]))), dim=1)
        found = ids[top.indices]
        found[torch.isinf(top.values)] = -1
        return top.values.cpu().numpy(), found.cpu().numpy()

    def ids(self) -> np.ndarray:
        return self._data[0].cpu().numpy()

    def save(self, path: Path) -> None:
        # Nothing to save: the vectors live in SQLite and loading them to the GPU is the whole rebuild.
        return None


def _add_and_tune_nprobe(index: faiss.Index, ivf: faiss.IndexIVF, ids: np.ndarray,
                         vectors: np.ndarray) -> tuple[int, float]:
    """Add the vectors and return (smallest nprobe whose recall@10 reaches TARGET_RECALL, that recall).

    Recall is measured against exact search over the rest of the vectors, with queries made from held-out
    vectors of the collection pushed off them by random noise (cosine ~0.45 to where they came from, as a
    question is to its passages), before the held-out ones are added too; nprobe doubles from 1.
    """
    rng = np.random.default_rng(0)
    order = rng.permutation(len(ids))
    held, rest = order[:min(_HELD_OUT, len(ids) // 10)], order[min(_HELD_OUT, len(ids) // 10):]
    index.add_with_ids(vectors[rest], ids[rest])
    nprobe, recall = int(ivf.nlist), 1.0
    if len(held):
        queries = normalise(vectors[held] + 2 * normalise(rng.normal(size=(len(held), vectors.shape[1]))))
        exact = faiss.IndexFlatIP(vectors.shape[1])
        exact.add(vectors[rest])
        _, truth = exact.search(queries, RECALL_AT)
        truth = ids[rest][truth]
        candidate = 1
        while candidate < ivf.nlist:
            ivf.nprobe = candidate
            _, found = index.search(queries, RECALL_AT)
            measured = float(np.mean([len(set(t) & set(f)) / RECALL_AT for t, f in zip(truth, found, strict=True)]))
            if measured >= TARGET_RECALL:
                nprobe, recall = candidate, measured
                break
            candidate *= 2
    index.add_with_ids(vectors[held], ids[held])
    return nprobe, recall


_GPU_RESOURCES: list[object] = []


def _gpu_resources() -> object:
    if not _GPU_RESOURCES:
        _GPU_RESOURCES.append(faiss.StandardGpuResources())
    return _GPU_RESOURCES[0]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
