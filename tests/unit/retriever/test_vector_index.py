from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from services.retriever.vector_index import TorchExactIndex, VectorIndex, normalise


def _clustered(n: int, dimension: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dimension))
    return (centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, dimension))).astype(np.float32)


def test_exact_index_finds_each_vector_first_and_deletes_by_id() -> None:
    vectors = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    index = VectorIndex(16, use_gpu=False)
    index.add(np.arange(100, 150), vectors)
    scores, ids = index.search(vectors[:5], 3)
    assert ids[:, 0].tolist() == [100, 101, 102, 103, 104]
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)
    assert index.remove(np.array([100, 101, 999])) == 2
    _, ids = index.search(vectors[:2], 3)
    assert 100 not in ids and 101 not in ids and index.size == 48


def test_search_honours_the_allowed_ids() -> None:
    vectors = np.random.default_rng(1).normal(size=(30, 8)).astype(np.float32)
    index = VectorIndex(8, use_gpu=False)
    index.add(np.arange(30), vectors)
    _, ids = index.search(vectors[0], 5, allowed=np.array([3, 7]))
    assert sorted(i for i in ids[0] if i >= 0) == [3, 7]


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    vectors = np.random.default_rng(2).normal(size=(20, 8)).astype(np.float32)
    index = VectorIndex(8, use_gpu=False)
    index.add(np.arange(20) * 3, vectors)
    index.version = 7
    index.save(tmp_path / "c.rvix")
    loaded = VectorIndex.load(tmp_path / "c.rvix", ann_threshold=100, use_gpu=False)
    assert loaded.version == 7 and loaded.size == 20 and loaded.kind == "flat"
    assert np.array_equal(loaded.search(vectors[4], 1)[1], [[12]])
    assert not (tmp_path / "c.rvix.tmp").exists()


def test_past_the_threshold_an_ivf_index_keeps_recall_at_10_above_0_9() -> None:
    n, dimension = 4000, 64
    vectors = _clustered(n, dimension, clusters=40, seed=3)
    queries = _clustered(100, dimension, clusters=40, seed=4)
    index = VectorIndex(dimension, ann_threshold=1000, use_gpu=False)
    index.build(np.arange(n), vectors)
    assert index.kind == "ivf"
    truth = np.argsort(-(normalise(queries) @ normalise(vectors).T), axis=1)[:, :10]
    _, found = index.search(queries, 10)
    recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert recall >= 0.9, recall
    assert index.remove(np.arange(0, 100)) == 100 and index.size == n - 100


def test_needs_rebuild_when_crossing_the_threshold() -> None:
    index = VectorIndex(4, ann_threshold=10, use_gpu=False)
    index.add(np.arange(10), np.ones((10, 4), np.float32))
    assert not index.needs_rebuild()
    index.add(np.array([10]), np.ones((1, 4), np.float32))
    assert index.needs_rebuild()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_torch_exact_index_matches_faiss(device: str) -> None:
    vectors = np.random.default_rng(5).normal(size=(200, 32)).astype(np.float32)
    faiss_index, torch_index = VectorIndex(32, use_gpu=False), TorchExactIndex(32, device=device)
    for index in (faiss_index, torch_index):
        index.add(np.arange(200), vectors)
        index.remove(np.arange(0, 200, 2))
    queries = vectors[:10]
    expected, found = faiss_index.search(queries, 5)[1], torch_index.search(queries, 5)[1]
    # float16 on the GPU may swap near-ties below the top hit
    assert np.array_equal(expected[:, 0], found[:, 0]) and np.mean(expected == found) >= 0.8
    _, ids = torch_index.search(queries[0], 4, allowed=np.array([1, 3]))
    assert sorted(ids[0].tolist()) == [-1, -1, 1, 3]
