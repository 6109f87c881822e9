"""The two vector stores side by side: `local` (SQLite + FAISS) and `milvus` (milvus-lite, the embedded Milvus engine).

SciFact, through the REST API of two retriever processes that share one embed process (same model, same
chunking, same requests; run one after the other so they never compete for the CPU):
  - nDCG@10 of dense, sparse and hybrid search over the 5,183-abstract corpus (the training claims);
  - ingestion throughput (documents per second, embedding included: it is the same work for both);
  - search latency p50/p99 at concurrency 1 and 16 (hybrid, top 10; a warm-up for both first).
Synthetic: 200k vectors (384-d, clustered like sentence embeddings) indexed by each store's CPU index: the local
store's FAISS IVF as the retriever builds it (nprobe tuned for recall at build), and the Milvus store's HNSW written
through the store itself into milvus-lite; recall@10 of each against exact search, and their latency next to exact
search's (numpy, in process).

    python bench/vector_stores.py                    # both parts; starts embed and the two retrievers itself
    python bench/vector_stores.py --parts synthetic --vectors 50000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.rag_eval import documents_in_order, gather_bounded, ingest, load_scifact, ndcg_at_k, search  # noqa: E402
from bench.report import print_table, save_result  # noqa: E402
from tests.support.processes import ServiceProcess, free_port  # noqa: E402

STORES = ("local", "milvus")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# SciFact through REST

async def latency(http: httpx.AsyncClient, queries: list[str], concurrency: int, requests: int,
                  warmup: int) -> dict:
    async def one(query: str) -> float:
        started = time.perf_counter()
        await search(http, "scifact", query, "hybrid", top_k=10)
        return time.perf_counter() - started

    for query in queries[:warmup]:
        await one(query)
    workload = [queries[i % len(queries)] for i in range(requests)]
    started = time.perf_counter()
    seconds = await gather_bounded(workload, one, concurrency, f"latency c={concurrency}")
    wall = time.perf_counter() - started
    return {"p50_ms": 1000 * percentile(seconds, 50), "p99_ms": 1000 * percentile(seconds, 99),
            "mean_ms": 1000 * statistics.fmean(seconds), "requests_per_s": len(workload) / wall,
            "requests": len(workload)}


async def scifact_store(url: str, args: argparse.Namespace) -> dict:
    documents, queries, qrels = load_scifact(args.queries, args.corpus_docs)
    async with httpx.AsyncClient(base_url=url, timeout=900) as http:
        throughput = await ingest(http, "scifact", documents, keep=False)
        ndcg = {}
        for search_type in ("dense", "sparse", "hybrid"):
            async def score(query_id: str, kind: str = search_type) -> float:
                chunks = await search(http, "scifact", queries[query_id], kind, top_k=30)
                return ndcg_at_k(documents_in_order(chunks), qrels[query_id])
            scores = await gather_bounded(list(queries), score, 4, f"nDCG {search_type}")
            ndcg[search_type] = sum(scores) / len(scores)
        texts = list(queries.values())
        timings = {f"concurrency_{c}": await latency(http, texts, c, args.latency_requests, args.warmup)
                   for c in (1, 16)}
    return {"ndcg@10": ndcg, "ingestion": throughput, "search_latency_hybrid_top10": timings,
            "corpus_docs": len(documents), "queries": len(queries)}


def run_scifact(args: argparse.Namespace) -> dict:
    logs = Path(tempfile.mkdtemp(prefix="vector-stores-"))
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict] = {}
    with ExitStack() as stack:
        embed_url = args.embed_url
        if not embed_url:
            embed_url = stack.enter_context(ServiceProcess("embed", env=env, log_dir=logs)).wait_ready(600).url
        for store in STORES:  # one after the other: the two never compete for the CPU or the embed service
            retriever_env = {**env, "RETRIEVER_DATA_DIR": str(logs / store), "RETRIEVER_VECTOR_STORE": store,
                             "RETRIEVER_EMBED_URL": embed_url,
                             "RETRIEVER_RERANK_URL": f"http://127.0.0.1:{free_port()}",
                             "RETRIEVER_LLM_URL": f"http://127.0.0.1:{free_port()}"}
            (logs / f"log-{store}").mkdir()
            with ServiceProcess("retriever", env=retriever_env, log_dir=logs / f"log-{store}") as retriever:
                retriever.wait_ready(300)
                print(f"{store}: retriever on {retriever.url} (logs in {logs})")
                results[store] = asyncio.run(scifact_store(retriever.url, args))
    return results


# 200k synthetic vectors through the Milvus store

def clustered_vectors(count: int, dimension: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around `clusters` random centres: neighbourhoods like those of sentence embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dimension)).astype(np.float32)
    points = centres[rng.integers(0, clusters, count)] + 0.6 * rng.normal(size=(count, dimension)).astype(np.float32)
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def run_synthetic(args: argparse.Namespace) -> dict:
    """Both stores' CPU indexes on the same vectors and queries, each against the same exact top 10."""
    dimension, k = 384, 10
    vectors = clustered_vectors(args.vectors, dimension, clusters=2000, seed=0)
    queries = clustered_vectors(args.synthetic_queries, dimension, clusters=2000, seed=0)[::-1].copy()
    queries = queries + 0.05 * np.random.default_rng(1).normal(size=queries.shape).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact_seconds, exact_rows = [], []
    for query in queries:
        t0 = time.perf_counter()
        exact_rows.append(set(np.argpartition(-(vectors @ query), k)[:k].tolist()))
        exact_seconds.append(time.perf_counter() - t0)
    return {"vectors": len(vectors), "dimension": dimension, "queries": len(queries), "k": k,
            "exact_numpy_latency_ms": _latency_ms(exact_seconds),
            "local": _synthetic_local(vectors, queries, exact_rows, k),
            "milvus": _synthetic_milvus(vectors, queries, exact_rows, k)}


def _latency_ms(seconds: list[float]) -> dict[str, float]:
    return {"p50": 1000 * percentile(seconds, 50), "p99": 1000 * percentile(seconds, 99)}


def _synthetic_local(vectors: np.ndarray, queries: np.ndarray, exact_rows: list[set[int]], k: int) -> dict:
    """The local store's FAISS index as the retriever builds it: IVF above `ann_threshold`, nprobe tuned at build."""
    from services.retriever.vector_index import VectorIndex

    index = VectorIndex(vectors.shape[1])
    started = time.perf_counter()
    index.build(np.arange(len(vectors), dtype=np.int64), vectors)
    build_seconds = time.perf_counter() - started
    seconds, recalls = [], []
    index.search(queries[:1], k)  # warm-up
    for query, exact in tqdm(list(zip(queries, exact_rows, strict=True)), desc="search local"):
        t0 = time.perf_counter()
        _, ids = index.search(query[None, :], k)
        seconds.append(time.perf_counter() - t0)
        recalls.append(len(set(ids[0].tolist()) & exact) / k)
    return {"index": {"type": index.kind, "nprobe": index.nprobe, "recall_measured_at_build": index.measured_recall},
            "build_seconds": build_seconds, "vectors_per_s": len(vectors) / build_seconds,
            "recall@10": statistics.fmean(recalls), "ann_latency_ms": _latency_ms(seconds)}


def _synthetic_milvus(vectors: np.ndarray, queries: np.ndarray, exact_rows: list[set[int]], k: int) -> dict:
    from services.retriever.milvus_store import MilvusStore, chunk_key
    from services.retriever.store import NewChunk, NewDocument

    folder = Path(tempfile.mkdtemp(prefix="milvus-synthetic-"))
    store = MilvusStore(str(folder / "milvus.db"))
    collection = store.create_collection("synthetic")
    # The vectors go in as chunk rows of the store's own schema, in large batches: the index is what is measured.
    store.write_documents(collection, [NewDocument("d0", "d0", {}, "f", "", [NewChunk("vector 0", {}, vectors[0])])],
                          set())
    collection = store.collection("synthetic") or collection
    started = time.perf_counter()
    batch = 5000
    for start in tqdm(range(1, len(vectors), batch), desc="write milvus", unit="batch"):
        rows = [row for i in range(start, min(start + batch, len(vectors)))
                for row in store._chunk_rows(collection, NewDocument(f"d{i}", f"d{i}", {}, "f", "", [
                    NewChunk(f"vector {i}", {}, vectors[i])]))]
        store.client.insert(store._chunks_of("synthetic"), rows)
    store.wait_for_index(collection)
    write_seconds = time.perf_counter() - started
    row_of = {chunk_key("synthetic", f"d{i}", "f", 0): i for i in range(len(vectors))}  # chunk id -> vector row
    seconds, recalls = [], []
    store.dense_search([collection], queries[0], k, None)  # warm-up: loads the index
    for query, exact in tqdm(list(zip(queries, exact_rows, strict=True)), desc="search milvus"):
        t0 = time.perf_counter()
        found = store.dense_search([collection], query, k, None)
        seconds.append(time.perf_counter() - t0)
        recalls.append(len({row_of[i] for i, _ in found} & exact) / k)
    store.close()
    return {"index": {"type": store.index_type, "build": store.index_params,
                      "search": store._default_search_params(k)},
            "write_seconds": write_seconds, "vectors_per_s": len(vectors) / write_seconds,
            "recall@10": statistics.fmean(recalls), "ann_latency_ms": _latency_ms(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["scifact", "synthetic"], choices=["scifact", "synthetic"])
    parser.add_argument("--embed-url", default="", help="a running embed service (else one is started)")
    parser.add_argument("--queries", type=int, default=300, help="SciFact training claims scored (0: all 809)")
    parser.add_argument("--corpus-docs", type=int, default=0,
                        help="0: all 5,183 abstracts; N: the cited ones plus random others up to N")
    parser.add_argument("--latency-requests", type=int, default=160, help="search requests per concurrency level")
    parser.add_argument("--warmup", type=int, default=8, help="searches before timing, for each store")
    parser.add_argument("--vectors", type=int, default=200_000)
    parser.add_argument("--synthetic-queries", type=int, default=200)
    args = parser.parse_args()
    results: dict[str, object] = {}
    if "scifact" in args.parts:
        results["scifact"] = run_scifact(args)
    if "synthetic" in args.parts:
        results["synthetic"] = run_synthetic(args)
    report(args, results)


def report(args: argparse.Namespace, results: dict) -> None:
    scifact = results.get("scifact")
    if scifact:
        rows = []
        for store in STORES:
            r = scifact[store]
            timings = r["search_latency_hybrid_top10"]
            c1, c16 = timings["concurrency_1"], timings["concurrency_16"]
            rows.append([store, *(round(r["ndcg@10"][t], 4) for t in ("dense", "sparse", "hybrid")),
                         round(r["ingestion"]["docs_per_s"] or 0, 2), round(c1["p50_ms"], 1), round(c1["p99_ms"], 1),
                         round(c16["p50_ms"], 1), round(c16["p99_ms"], 1)])
        print_table("SciFact through REST (same embed service, run one after the other)",
                    ["store", "dense", "sparse", "hybrid", "ingest docs/s", "c1 p50 ms", "c1 p99 ms", "c16 p50 ms",
                     "c16 p99 ms"], rows)
        gaps = {t: scifact["milvus"]["ndcg@10"][t] - scifact["local"]["ndcg@10"][t]
                for t in ("dense", "sparse", "hybrid")}
        print("nDCG@10 milvus - local:", {t: round(g, 4) for t, g in gaps.items()})
        scifact["ndcg_gap_milvus_minus_local"] = gaps
    synthetic = results.get("synthetic")
    if synthetic:
        exact = synthetic["exact_numpy_latency_ms"]
        rows = [[f"{store} ({r['index']['type']})", round(r["recall@10"], 4), round(r["ann_latency_ms"]["p50"], 2),
                 round(r["ann_latency_ms"]["p99"], 2), round(r["vectors_per_s"], 1)]
                for store, r in ((store, synthetic[store]) for store in STORES)]
        rows.append(["exact (numpy, in process)", 1.0, round(exact["p50"], 2), round(exact["p99"], 2), "-"])
        print_table(f"{synthetic['vectors']} synthetic vectors, one query at a time",
                    ["index", "recall@10", "p50 ms", "p99 ms", "indexed vectors/s"], rows)
    workload = {"parts": args.parts, "scifact_queries": args.queries,
                "scifact_corpus": args.corpus_docs or 5183, "latency_requests": args.latency_requests,
                "warmup": args.warmup, "synthetic_vectors": args.vectors, "synthetic_queries": args.synthetic_queries}
    path = save_result("vector-stores-" + "-".join(args.parts), workload=workload,
                       ours={"milvus": {p: r["milvus"] for p, r in results.items()}},
                       peer={"local": {p: r["local"] for p, r in results.items()},
                             "synthetic_exact_search": synthetic and synthetic["exact_numpy_latency_ms"]},
                       extra={"results": results})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
