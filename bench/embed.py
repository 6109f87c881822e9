"""Served embedding throughput: our embed service, infinity-emb (a TEI-style server) and in-process
sentence-transformers, on the same texts, model directory, device, dtype and torch threads, in one run.

Embeds SciFact documents (title + " " + text) over HTTP at several client concurrencies. Each client sends
requests of `--docs-per-request` documents (32 by default: what an ingestion pipeline sends per batch); both
servers cut a text at the model's 256 tokens, the way sentence-transformers itself does (ours is asked for
`truncate: END`, infinity-emb always truncates). `SentenceTransformer.encode` (batch size 32) embeds the same
texts in this process once before the first served round and after each one; a served run is compared with
the mean of the in-process runs either side of it, and ours with infinity-emb at the same concurrency (the two
run back to back). Tokens per second use one count for everyone: the texts' tokens after truncation.

Both servers are started here (start-up is outside every timed region) and both get the same untimed warm-up
load; both stay up, so each one's CPU time while the other is measured is recorded too (`idle_cpu_s`).
infinity-emb is installed on first use into its own venv under `.bench/` (git-ignored), with the same torch
version as ours, and runs its torch engine on the same model directory with our batch size. `--dtype` (default
auto: what our service picks, bf16 on a CPU with native bf16 matmul) is given to every side: our service's
`EMBED_DTYPE`, infinity-emb's `--dtype`, and the in-process model.

    python bench/embed.py --save             # 1000 docs, concurrency 1 4 16 64, both servers, bench/results/
    python bench/embed.py --peer none --limit 256 --concurrency 4    # ours and in-process only, a quick look
    python bench/embed.py --url http://127.0.0.1:8001 --peer none --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.report import print_table, require_clean_tree, save_result  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "eval" / "scifact" / "corpus.jsonl"
PEER_BATCH = 32  # sentence-transformers' default
INFINITY_VERSION = "0.0.78"
SERVED_NAME = "all-MiniLM-L6-v2"
EMBED_DTYPES = ("auto", "float32", "bfloat16", "float16")  # EMBED_DTYPE's values (settings.py)


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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(slots=True, frozen=True)
class Served:
    """An embedding server under test: where it listens, how a request body looks, its process (if started)."""

    name: str
    url: str
    body: Callable[[list[str]], dict]
    pid: int | None
    config: dict


async def serve_run(server: Served, api_key: str | None, texts: list[str], tokens: int, per_request: int,
                    concurrency: int) -> dict:
    requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    pending = iter(requests)
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    progress = tqdm(total=len(texts), desc=f"{server.name} c={concurrency}", unit="doc", leave=False)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for batch in pending:
            start = time.perf_counter()
            response = await client.post("/v1/embeddings", json=server.body(batch))
            latencies.append(time.perf_counter() - start)
            response.raise_for_status()
            if len(response.json()["data"]) != len(batch):
                raise RuntimeError(f"{server.name} returned {len(response.json()['data'])} vectors for {len(batch)}")
            progress.update(len(batch))

    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    progress.close()
    return {"server": server.name, "concurrency": concurrency, "docs": len(texts), "seconds": round(elapsed, 3),
            "docs_per_s": len(texts) / elapsed, "tokens_per_s": tokens / elapsed,
            "p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 0.99)}


class InProcessPeer:
    """`SentenceTransformer.encode` (batch 32) in this process, on a fixed list of texts."""

    def __init__(self, model: SentenceTransformer, texts: list[str], name: str = "in-process") -> None:
        self.model, self.texts, self.name = model, texts, name
        self.lengths = [len(ids) for ids in model.tokenizer(texts, truncation=True,
                                                            max_length=model.max_seq_length)["input_ids"]]
        self.tokens = sum(self.lengths)

    def run(self, docs: int | None = None) -> dict:
        """One timed pass; `docs` is what docs/s counts (default: the texts)."""
        cpu, start = time.process_time(), time.perf_counter()
        self.model.encode(self.texts, batch_size=PEER_BATCH, normalize_embeddings=True)
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        docs = docs or len(self.texts)
        return {"peer": self.name, "texts": len(self.texts), "seconds": round(elapsed, 3),
                "docs_per_s": docs / elapsed, "texts_per_s": len(self.texts) / elapsed,
                "tokens_per_s": self.tokens / elapsed, "cpu_seconds": round(cpu, 3),
                "cpu_ms_per_doc": 1000 * cpu / docs}


def load_peer_model(model_path: str, device: str, warmup: list[str], dtype: str = "auto") -> SentenceTransformer:
    """The in-process model in `dtype` (resolved as our service resolves `EMBED_DTYPE`), warmed up on a few texts
    (every served side gets an untimed warm-up too)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device=device).to(resolved_dtype(dtype, device))
    model.encode(warmup, batch_size=PEER_BATCH, normalize_embeddings=True)
    return model


def resolved_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype our embed service runs in for `EMBED_DTYPE=dtype` on `device`."""
    from common.cpu import native_bf16_matmul
    from services.embed.encoder import resolve_dtype

    return resolve_dtype(dtype, device, native_bf16_matmul())[0]


@contextmanager
def serve_ours(model_path: str, device: str, dtype: str, threads: dict[str, str], log_dir: Path) -> Iterator[Served]:
    from tests.support.processes import ServiceProcess

    env = {"EMBED_MODEL": model_path, "EMBED_DEVICE": device, "EMBED_DTYPE": dtype, "EMBED_LOG_LEVEL": "warning",
           "EMBED_SERVED_MODEL_NAME": SERVED_NAME, "HF_HUB_OFFLINE": "1", **threads}
    process = ServiceProcess("embed", env=env, log_dir=log_dir).start()
    try:
        process.wait_ready(900)
        from services.embed.settings import EmbedSettings

        config = {"command": "python -m services.embed", "env": env,
                  "max_batch_size": EmbedSettings().max_batch_size}
        yield Served("ours", process.url, lambda batch: {"input": batch, "model": SERVED_NAME, "truncate": "END",
                                                         "input_type": "passage"}, process.process.pid, config)
    finally:
        process.stop()


@contextmanager
def serve_infinity(model_path: str, device: str, dtype: str, threads: dict[str, str], batch_size: int,
                   log_dir: Path) -> Iterator[Served]:
    """infinity-emb's `v2` server, torch engine, on the same model directory; routes under /v1 like ours."""
    from bench.llm_servers import ensure_venv, free_port, running, wait_until

    torch_version = importlib.metadata.version("torch").split("+")[0]
    venv = ensure_venv("infinity-emb", [f"infinity-emb[server,torch]=={INFINITY_VERSION}",
                                        f"torch=={torch_version}"])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(venv / "bin" / "infinity_emb"), "v2", "--model-id", model_path,
               "--served-model-name", SERVED_NAME, "--engine", "torch", "--device", device, "--dtype", dtype,
               "--batch-size", str(batch_size), "--no-bettertransformer", "--no-model-warmup",
               "--url-prefix", "/v1", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {"HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0", "DO_NOT_TRACK": "1", **threads}
    log_path = log_dir / "embed-infinity-emb.log"
    with running(command, env, log_path) as process:
        wait_until(lambda: httpx.get(f"{url}/v1/models", timeout=5).status_code == 200, process, "infinity-emb",
                   log_path, timeout=900)
        config = {"command": " ".join(command[1:]), "env": env, "version": INFINITY_VERSION,
                  "max_batch_size": batch_size}
        yield Served("infinity-emb", url, lambda batch: {"input": batch, "model": SERVED_NAME}, process.pid, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="BEIR corpus.jsonl (title, text)")
    parser.add_argument("--limit", type=int, default=1000, help="documents to embed per run")
    parser.add_argument("--docs-per-request", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--peer", choices=("infinity-emb", "none"), default="infinity-emb",
                        help="the served peer next to ours (the in-process figure is always measured)")
    parser.add_argument("--url", help="a running embed service of ours (default: start one on loopback)")
    parser.add_argument("--model", default="", help="model directory (default: the bundled all-MiniLM-L6-v2)")
    parser.add_argument("--device", default="auto", help="device for every side")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, the same on every side")
    parser.add_argument("--dtype", default="auto", choices=EMBED_DTYPES,
                        help="model dtype on every side (auto: our service's choice for the device)")
    parser.add_argument("--save", action="store_true",
                        help="write bench/results/embed-<device>-<date>.json (refused from uncommitted code)")
    args = parser.parse_args()
    if args.save:
        require_clean_tree()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    os.environ.update(threads)
    import torch

    from common.model_files import bundled_embedding_model
    from services.embed.encoder import resolve_device
    from services.embed.settings import EmbedSettings

    torch.set_num_threads(args.threads)
    model_path = args.model or str(bundled_embedding_model())
    device = resolve_device(args.device)
    texts = load_texts(args.corpus, args.limit)
    api_key = os.environ.get("API_KEY")
    dtype = str(resolved_dtype(args.dtype, device)).removeprefix("torch.")  # named for infinity-emb too
    peer = InProcessPeer(load_peer_model(model_path, device, texts[:64], dtype), texts)

    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp, ExitStack() as stack:
        if args.url:
            servers = [Served("ours", args.url, lambda batch: {"input": batch, "truncate": "END",
                                                               "input_type": "passage"}, None, {"url": args.url})]
        else:
            servers = [stack.enter_context(serve_ours(model_path, device, dtype, threads, Path(tmp)))]
        if args.peer == "infinity-emb":
            servers.append(stack.enter_context(serve_infinity(model_path, device, dtype, threads,
                                                              EmbedSettings().max_batch_size, Path(tmp))))
        for server in servers:  # the same untimed warm-up load for every server
            asyncio.run(serve_run(server, api_key, texts[:128], 0, args.docs_per_request, 4))
        # In-process runs alternate with served rounds, so each served run is compared with the in-process
        # runs either side of it while the machine's load drifts.
        inproc, served = [peer.run()], []
        for concurrency in args.concurrency:
            for server in servers:
                before = {s.name: process_cpu_seconds(s.pid) for s in servers if s.pid}
                run = asyncio.run(serve_run(server, api_key, texts, peer.tokens, args.docs_per_request, concurrency))
                spent = {s.name: process_cpu_seconds(s.pid) - before[s.name] for s in servers if s.pid}
                if server.name in spent:
                    run["server_cpu_ms_per_doc"] = 1000 * spent.pop(server.name) / len(texts)
                run["idle_cpu_s"] = {name: round(seconds, 3) for name, seconds in spent.items()}
                served.append(run)
            inproc.append(peer.run())
            for run in served[-len(servers):]:
                run["ratio_vs_in_process"] = run["docs_per_s"] / statistics.mean(
                    p["docs_per_s"] for p in inproc[-2:])
            if len(servers) == 2:
                ours_run, theirs = served[-2:]
                ours_run["ratio_vs_infinity_emb"] = ours_run["docs_per_s"] / theirs["docs_per_s"]

    in_process = {"docs": len(texts), "batch_size": PEER_BATCH, "tokens": peer.tokens,
                  "docs_per_s": statistics.mean(p["docs_per_s"] for p in inproc),
                  "tokens_per_s": statistics.mean(p["tokens_per_s"] for p in inproc),
                  "cpu_ms_per_doc": statistics.mean(p["cpu_ms_per_doc"] for p in inproc), "runs": inproc}
    rows = [[f"{run['server']} c={run['concurrency']}", run["docs_per_s"], run["tokens_per_s"], run["p50_ms"],
             run["p99_ms"], run.get("server_cpu_ms_per_doc", "-"), run["ratio_vs_in_process"],
             run.get("ratio_vs_infinity_emb", "-")] for run in served]
    rows.append([f"sentence-transformers in-process (mean of {len(inproc)})", in_process["docs_per_s"],
                 in_process["tokens_per_s"], "-", "-", in_process["cpu_ms_per_doc"], 1.0, "-"])
    print_table(f"embeddings, {len(texts)} SciFact docs, {args.docs_per_request} docs/request, {device}, {dtype}, "
                f"{args.threads} torch threads",
                ["run", "docs/s", "tokens/s", "p50 ms", "p99 ms", "cpu ms/doc", "vs in-process", "vs infinity"],
                rows)
    if not args.save:
        return
    workload = {"corpus": str(args.corpus), "docs": len(texts), "docs_per_request": args.docs_per_request,
                "truncate": "END (infinity-emb: its default truncation at the model's limit)", "model": model_path,
                "torch_device": device, "dtype": dtype, "torch_threads": args.threads, "concurrency": args.concurrency,
                "servers": {s.name: s.config for s in servers},
                "method": "both servers up; per concurrency ours then infinity-emb, then an in-process run; a served "
                          "run's ratio is over the mean of the in-process runs either side; tokens/s from one token "
                          "count (truncated at 256) for every side; cpu ms/doc is the measured server's CPU time"}
    ours = [run for run in served if run["server"] == "ours"]
    peers = {"sentence-transformers in-process": in_process,
             **({"infinity-emb": [run for run in served if run["server"] == "infinity-emb"]}
                if args.peer == "infinity-emb" else {})}
    path = save_result("embed", workload=workload, ours=ours, peer=peers)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
