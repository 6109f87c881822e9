"""A vector index per collection: inner product over L2-normalised vectors, ids are chunk row ids.

Exact search (FAISS IndexFlatIP in an IDMap) for small collections; past `ann_threshold` vectors an IVF
index (trained on the collection, supports delete by id) replaces it. FAISS runs on the GPU when faiss-gpu
and CUDA are there; with CUDA but no faiss-gpu an exact torch search on the GPU serves instead.
Saved atomically (temp file, fsync, rename) with the SQLite version it reflects, so start-up can tell if it is behind.
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

log = logging.getLogger(__name__)
_MAGIC = b"RVIX1"


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
        self._index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dimension))
        self._gpu_copy: faiss.Index | None = None

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors; the caller rebuilds from its stored vectors when `needs_rebuild()` says so."""
        if len(ids) == 0:
            return
        assert vectors.shape == (len(ids), self.dimension), (vectors.shape, self.dimension)
        self._index.add_with_ids(normalise(vectors), np.asarray(ids, dtype=np.int64))
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
        if len(ids) <= self.ann_threshold:
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dimension))
            self.kind, self.trained_on = "flat", 0
        else:
            nlist = max(16, int(4 * math.sqrt(len(ids))))
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dimension), self.dimension, nlist,
                                     faiss.METRIC_INNER_PRODUCT)
            log.info("training IVF index on %d vectors (nlist=%d)", len(ids), nlist)
            ivf.train(vectors)
            ivf.nprobe = max(16, nlist // 4)  # set on the index, so unfiltered search needs no params (GPU-able)
            index = faiss.IndexIDMap2(ivf)
            self.kind, self.trained_on = "ivf", len(ids)
        if len(ids):
            index.add_with_ids(vectors, ids)
        self._index, self._gpu_copy = index, None

    def remove(self, ids: np.ndarray) -> int:
        if len(ids) == 0:
            return 0
        removed = int(self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))))
        self._gpu_copy = None
        return removed

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of shape (len(queries), k), best first; missing hits have id -1."""
        queries = normalise(np.atleast_2d(queries))
        k = max(1, min(k, self.size)) if self.size else 1
        if self.size == 0 or (allowed is not None and len(allowed) == 0):
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        params = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
            params = (faiss.SearchParametersIVF(sel=selector, nprobe=self._nprobe()) if self.kind == "ivf"
                      else faiss.SearchParameters(sel=selector))
        index = self._searchable() if params is None else self._index
        scores, ids = index.search(queries, k, params=params) if params is not None else index.search(queries, k)
        return scores, ids

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(faiss.downcast_index(self._index).id_map).astype(np.int64)

    def _nprobe(self) -> int:
        nlist = int(faiss.extract_index_ivf(self._index).nlist)
        return max(16, nlist // 4)

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
                             "dimension": self.dimension}).encode()
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
            ivf.nprobe = max(16, int(ivf.nlist) // 4)
        return index


class TorchExactIndex:
    """Exact inner-product search with torch, for CUDA machines without faiss-gpu (also runs on CPU)."""

    kind = "torch-exact"

    def __init__(self, dimension: int, device: str = "cuda") -> None:
        import torch

        self._torch = torch
        self.dimension, self.device, self.version = dimension, device, 0
        self._ids = torch.zeros(0, dtype=torch.int64, device=device)
        self._vectors = torch.zeros((0, dimension), dtype=torch.float16 if device != "cpu" else torch.float32,
                                    device=device)

    @property
    def size(self) -> int:
        return int(self._ids.shape[0])

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        torch = self._torch
        new = torch.from_numpy(normalise(vectors)).to(self.device, self._vectors.dtype)
        self._vectors = torch.cat([self._vectors, new])
        self._ids = torch.cat([self._ids, torch.from_numpy(np.asarray(ids, np.int64)).to(self.device)])

    def needs_rebuild(self) -> bool:
        return False

    def build(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self._ids = self._ids[:0]
        self._vectors = self._vectors[:0]
        if len(ids):
            self.add(ids, vectors)

    def remove(self, ids: np.ndarray) -> int:
        torch = self._torch
        drop = torch.isin(self._ids, torch.from_numpy(np.asarray(ids, np.int64)).to(self.device))
        self._vectors, self._ids = self._vectors[~drop], self._ids[~drop]
        return int(drop.sum())

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        queries = torch.from_numpy(normalise(np.atleast_2d(queries))).to(self.device, self._vectors.dtype)
        scores = (queries @ self._vectors.T).float()
        if allowed is not None:
            keep = torch.isin(self._ids, torch.from_numpy(np.asarray(allowed, np.int64)).to(self.device))
            scores[:, ~keep] = -torch.inf
        k = max(1, min(k, self.size))
        if self.size == 0:
            return np.full((len(queries), 1), -np.inf, np.float32), np.full((len(queries), 1), -1, np.int64)
        top = torch.topk(scores, k, dim=1)
        ids = self._ids[top.indices]
        ids[torch.isinf(top.values)] = -1
        return top.values.cpu().numpy(), ids.cpu().numpy()

    def ids(self) -> np.ndarray:
        return self._ids.cpu().numpy()

    def save(self, path: Path) -> None:
        # Nothing to save: the vectors live in SQLite and loading them to the GPU is the whole rebuild.
        return None


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
