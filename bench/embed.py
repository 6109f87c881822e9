"""Served embedding throughput vs in-process sentence-transformers on the same texts and device.

Embeds SciFact documents (title + " " + text) through the HTTP service at several client concurrencies.
Each client sends requests of `--docs-per-request` documents (32 by default: what an ingestion pipeline
sends per chunk batch) with `truncate: END`, the way sentence-transformers itself cuts long text. In the
same run, `SentenceTransformer.encode` (default batch size 32) embeds the same texts in-process, once
before and after each served run; each served run is compared with the mean of its two neighbours. The
CPU time per document of the server process and of the in-process peer is recorded too: on a shared,
busy machine it is the steadier comparison.

    python bench/embed.py                    # starts the service on loopback, 1000 docs
    python bench/embed.py --url http://127.0.0.1:8001 --limit 5183 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.report import print_table, save_result  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "eval" / "scifact" / "corpus.jsonl"


def load_texts(corpus: Path, limit: int) -> list[str]:
    texts = []
    with corpus.open() as lines:
        for line in lines:
            doc = json.loads(line)
            texts.append(f"{doc.get('title', '')} {doc.get('text', '')}".strip())
            if len(texts) >= limit:
                break
    return texts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def serve_run(url: str, api_key: str | None, texts: list[str], per_request: int, concurrency: int,
                    model: str | None) -> dict:
    requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    pending = iter(requests)
    latencies: list[float] = []
    tokens = 0
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    progress = tqdm(total=len(texts), desc=f"served c={concurrency}", unit="doc", leave=False)

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        for batch in pending:
            body = {"input": batch, "truncate": "END", "input_type": "passage", **({"model": model} if model else {})}
            start = time.perf_counter()
            response = await client.post("/v1/embeddings", json=body)
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            tokens += response.json()["usage"]["prompt_tokens"]
            progress.update(len(batch))

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    progress.close()
    return {"concurrency": concurrency, "docs": len(texts), "seconds": round(elapsed, 3),
            "docs_per_s": len(texts) / elapsed, "tokens_per_s": tokens / elapsed,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99)}


class InProcessPeer:
    """`SentenceTransformer.encode` with its default batch size, on the same texts and device."""

    def __init__(self, model_path: str, device: str, texts: list[str]) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_path, device=device)
        if device.startswith("cuda"):
            self.model.half()
        self.texts = texts
        self.tokens = sum(len(ids) for ids in self.model.tokenizer(
            texts, truncation=True, max_length=self.model.max_seq_length)["input_ids"])
        self.model.encode(texts[:64], normalize_embeddings=True)  # warm-up

    def run(self) -> dict:
        cpu, start = time.process_time(), time.perf_counter()
        self.model.encode(self.texts, normalize_embeddings=True)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        return {"docs": len(self.texts), "seconds": round(elapsed, 3), "docs_per_s": len(self.texts) / elapsed,
                "tokens_per_s": self.tokens / elapsed, "cpu_ms_per_doc": 1000 * cpu / len(self.texts)}


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--limit", type=int, default=1000, help="documents to embed per run")
    parser.add_argument("--docs-per-request", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--url", help="a running embed service (default: start one on loopback)")
    parser.add_argument("--model", default="", help="model directory (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--device", default="auto", help="device for the started service and the peer")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from common.model_files import bundled_embedding_model
    from services.embed.encoder import resolve_device

    model_path = args.model or str(bundled_embedding_model())
    device = resolve_device(args.device)
    texts = load_texts(args.corpus, args.limit)
    api_key = os.environ.get("API_KEY")
    process = None
    if args.url is None:
        from tests.support.processes import ServiceProcess

        env = {"EMBED_MODEL": model_path, "EMBED_DEVICE": device, "EMBED_LOG_LEVEL": "warning"}
        process = ServiceProcess("embed", env=env).start().wait_ready()
    url = args.url or process.url
    try:
        peer = InProcessPeer(model_path, device, texts)
        asyncio.run(serve_run(url, api_key, texts[:128], args.docs_per_request, 4, None))  # warm-up
        # Peer and served runs alternate, so each served run is compared with the peer runs either side of it
        # while the machine's load drifts.
        peers, ours = [peer.run()], []
        for concurrency in args.concurrency:
            cpu = process_cpu_seconds(process.process.pid) if process else None
            run = asyncio.run(serve_run(url, api_key, texts, args.docs_per_request, concurrency, None))
            if cpu is not None:
                run["server_cpu_ms_per_doc"] = 1000 * (process_cpu_seconds(process.process.pid) - cpu) / len(texts)
            peers.append(peer.run())
            run["ratio_vs_peer"] = run["docs_per_s"] / statistics.mean(p["docs_per_s"] for p in peers[-2:])
            ours.append(run)
    finally:
        if process is not None:
            process.stop()
    peer_summary = {"docs": len(texts), "batch_size": 32,
                    "docs_per_s": statistics.mean(p["docs_per_s"] for p in peers),
                    "tokens_per_s": statistics.mean(p["tokens_per_s"] for p in peers),
                    "cpu_ms_per_doc": statistics.mean(p["cpu_ms_per_doc"] for p in peers), "runs": peers}

    rows = [[f"served c={run['concurrency']}", run["docs_per_s"], run["tokens_per_s"], run["p50_ms"],
             run["p99_ms"], run.get("server_cpu_ms_per_doc", "-"), run["ratio_vs_peer"]] for run in ours]
    rows.append(["in-process sentence-transformers (mean)", peer_summary["docs_per_s"],
                 peer_summary["tokens_per_s"], "-", "-", peer_summary["cpu_ms_per_doc"], 1.0])
    print_table(f"embeddings, {len(texts)} SciFact docs, {args.docs_per_request} docs/request, {device}",
                ["run", "docs/s", "tokens/s", "p50 ms", "p99 ms", "cpu ms/doc", "ours/peer"], rows)
    workload = {"corpus": str(args.corpus), "docs": len(texts), "docs_per_request": args.docs_per_request,
                "truncate": "END", "model": model_path, "torch_device": device,
                "concurrency": args.concurrency,
                "method": "peer runs alternate with served runs; ratio = served docs/s over the mean of the "
                          "peer runs either side; cpu ms/doc is the server process's CPU time (noise-robust)"}
    path = save_result("embed", workload=workload, ours=ours, peer=peer_summary)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
