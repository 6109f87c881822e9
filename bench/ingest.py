"""Ingestion throughput: `scripts/ingest.py` into the retriever (with the embed service) vs in-process
sentence-transformers on the same texts, in one run.

SciFact abstracts (title + " " + text) are written one `.txt` file per abstract (or, with `--layout jsonl`, one
`.jsonl` file), then ingested by the ingestion CLI's own code (`scripts/ingest.py`, default options) into a
fresh collection of a retriever backed by a real embed service, both started here on loopback. The whole
pipeline is timed: reading and fingerprinting the files, uploads, chunking, embedding, SQLite and FAISS writes.

In-process peers run `SentenceTransformer.encode(batch_size=32)` with the same torch thread count:
- `whole texts`: each abstract once, cut at the model's 256 tokens (what the issue compared against; the
  retriever cannot drop the rest of an abstract, so it embeds more tokens than this peer);
- `same chunks`: exactly the chunk texts the retriever embeds (the same work).
Both run in float32 (the issue's reference); where the embed service runs another dtype (`EMBED_DTYPE=auto` is
bf16 on a CPU with native bf16 matmul), both run again in that dtype (`whole texts bfloat16`, `same chunks
bfloat16`): `same chunks` in the service's dtype is the like-for-like comparison.
The `tokens` column counts what each side embedded, [CLS] and [SEP] included, so the gap in work between the two
workloads is on the table: on the first 1,500 abstracts, the default 512/128 chunking (capped at 254/63 for the
bundled MiniLM) embeds 565,443 tokens in 2,895 chunks, whole texts cut at 256 tokens 359,200 (1.57x; the whole
abstracts alone hold 498,050, 1.39x).
Peers and our runs alternate, and each of our runs is compared with the mean of the peer runs either side of
it. Start-up (services, model loads) is outside every timed region; nobody gets an untimed warm-up pass over
the corpus, everyone gets the same short warm-up.

    python bench/ingest.py --save                  # 1,500 abstracts, 2 rounds, writes bench/results/
    python bench/ingest.py --limit 300 --rounds 1  # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.embed import (  # noqa: E402
    EMBED_DTYPES,
    PEER_BATCH,
    InProcessPeer,
    load_peer_model,
    load_texts,
    process_cpu_seconds,
    resolved_dtype,
)
from bench.report import print_table, require_clean_tree, save_result  # noqa: E402

DEFAULT_CORPUS = ROOT.parent / "shared" / "eval" / "scifact" / "corpus.jsonl"


def write_corpus(texts: list[str], folder: Path, layout: str) -> Path:
    """The abstracts as files the ingestion CLI reads: one .txt each, or one .jsonl of {id, text} lines."""
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "jsonl":
        lines = (json.dumps({"id": f"scifact-{i}", "text": text}) for i, text in enumerate(texts))
        (folder / "scifact.jsonl").write_text("\n".join(lines) + "\n")
    else:
        for i, text in enumerate(texts):
            (folder / f"{i:05d}.txt").write_text(text)
    return folder


def embed_counters(url: str) -> dict[str, float]:
    """The embed service's running totals: inputs, real tokens, padded tokens and model batches."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"embed_inputs_total": "inputs", "embed_prompt_tokens_total": "tokens",
              "embed_batch_tokens_sum": "padded_tokens", "embed_batch_size_count": "batches",
              "embed_batch_seconds_sum": "model_seconds"}
    found = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in wanted:
                found[wanted[sample.name]] += sample.value
    return found


def padded_tokens(peer: InProcessPeer) -> int:
    """The tokens `encode()` runs: it sorts texts by length and pads each batch of 32 to its longest member."""
    order = sorted(range(len(peer.texts)), key=lambda i: -len(peer.texts[i]))
    batches = [order[s:s + PEER_BATCH] for s in range(0, len(order), PEER_BATCH)]
    return sum(max(peer.lengths[i] for i in batch) * len(batch) for batch in batches)


def chunk_texts(texts: list[str], model_dir: Path) -> list[str]:
    """The chunk texts the retriever embeds for these abstracts, with its default chunking settings."""
    from services.retriever.chunking import Chunker
    from services.retriever.loaders import make_document
    from services.retriever.settings import RetrieverSettings

    settings = RetrieverSettings()
    chunker = Chunker.from_model_dir(model_dir)
    return [piece.text for text in texts for section in make_document("doc.txt", text).sections
            for piece in chunker.chunk(section.text, settings.chunk_size, settings.chunk_overlap)]


def ingest_once(corpus: Path, url: str, collection: str, docs: int, processes: dict) -> dict:
    """One run of the ingestion CLI's code into a fresh collection, timed end to end."""
    from scripts import ingest as cli

    args = cli.parse_args([str(corpus), "--collection", collection, "--url", url])
    cpu_before = {name: process_cpu_seconds(p.process.pid) for name, p in processes.items()}
    counters_before = embed_counters(processes["embed"].url)
    cpu, start = time.process_time(), time.perf_counter()
    summary = asyncio.run(cli.run(args))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if summary.failed or len(summary.ingested) != len(list(p for p in corpus.iterdir())):
        raise RuntimeError(f"ingestion incomplete: {len(summary.ingested)} files ingested, failed: "
                           f"{summary.failed[:3]}")
    counters = {k: v - counters_before[k] for k, v in embed_counters(processes["embed"].url).items()}
    cpu_seconds = {name: round(process_cpu_seconds(p.process.pid) - cpu_before[name], 3)
                   for name, p in processes.items()}
    cpu_seconds["cli"] = round(cpu, 3)
    return {"collection": collection, "seconds": round(elapsed, 3), "docs_per_s": docs / elapsed,
            "chunks": summary.chunks, "chunks_per_s": summary.chunks / elapsed,
            "tokens_per_s": counters["tokens"] / elapsed, "embedded_tokens": int(counters["tokens"]),
            "padded_tokens": int(counters["padded_tokens"]), "model_batches": int(counters["batches"]),
            "mean_batch": counters["inputs"] / max(1, counters["batches"]),
            "model_seconds": round(counters["model_seconds"], 3), "cpu_seconds": cpu_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="BEIR corpus.jsonl (title, text)")
    parser.add_argument("--limit", type=int, default=1500, help="abstracts to ingest per run")
    parser.add_argument("--layout", choices=("files", "jsonl"), default="files",
                        help="one .txt per abstract (default) or one .jsonl file holding them all")
    parser.add_argument("--rounds", type=int, default=2, help="our ingestion runs, each between peer runs")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, the same on both sides")
    parser.add_argument("--embed-dtype", default="auto", choices=EMBED_DTYPES,
                        help="EMBED_DTYPE of the embed service")
    parser.add_argument("--save", action="store_true", help="write bench/results/ingest-<device>-<date>.json "
                                                            "(refused from uncommitted code)")
    args = parser.parse_args()
    if args.save:
        require_clean_tree()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    os.environ.update(threads)
    import torch

    from common.model_files import bundled_embedding_model
    from tests.support.processes import ServiceProcess, free_port

    torch.set_num_threads(args.threads)
    model_dir = bundled_embedding_model()
    texts = load_texts(args.corpus, args.limit)
    chunks = chunk_texts(texts, model_dir)
    # The service resolves EMBED_DTYPE the same way on this machine and torch.
    embed_dtype = str(resolved_dtype(args.embed_dtype, "cpu")).removeprefix("torch.")
    peers = []
    for dtype in dict.fromkeys(["float32", embed_dtype]):
        model = load_peer_model(str(model_dir), "cpu", texts[:64], dtype)  # the warm-up our side gets too
        suffix = "" if dtype == "float32" else f" {dtype}"
        peers += [InProcessPeer(model, texts, f"whole texts{suffix}"),
                  InProcessPeer(model, chunks, f"same chunks{suffix}")]

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        work = Path(tmp)
        corpus = write_corpus(texts, work / "corpus", args.layout)
        warmup = write_corpus(texts[-64:] if len(texts) > 64 else texts, work / "warmup", args.layout)
        quiet = {"EMBED_LOG_LEVEL": "warning", "RETRIEVER_LOG_LEVEL": "warning", "TOKENIZERS_PARALLELISM": "false"}
        embed = ServiceProcess("embed", env={**threads, **quiet, "EMBED_DTYPE": embed_dtype},
                               log_dir=work).start()
        dead = f"http://127.0.0.1:{free_port()}"  # llm and rerank are not part of ingestion
        retriever = ServiceProcess("retriever", log_dir=work, env={
            **threads, **quiet, "RETRIEVER_DATA_DIR": str(work / "data"), "RETRIEVER_EMBED_URL": embed.url,
            "RETRIEVER_LLM_URL": dead, "RETRIEVER_RERANK_URL": dead}).start()
        processes = {"embed": embed, "retriever": retriever}
        try:
            embed.wait_ready(600)
            retriever.wait_ready(600)
            ingest_once(warmup, retriever.url, "warmup", len(texts), processes)
            peer_runs = [[peer.run(len(texts)) for peer in peers]]
            ours = []
            for round_ in range(1, args.rounds + 1):
                ours.append(ingest_once(corpus, retriever.url, f"scifact-{round_}", len(texts), processes))
                peer_runs.append([peer.run(len(texts)) for peer in peers])
        finally:
            retriever.stop()
            embed.stop()

    if ours[0]["chunks"] != len(chunks):
        raise RuntimeError(f"the retriever made {ours[0]['chunks']} chunks, the local chunker {len(chunks)}: the "
                           f"'same chunks' peer would not be doing the same work")
    ratio_keys = [f"ratio_vs_{peer.name.replace(' ', '_')}" for peer in peers]
    for i, run in enumerate(ours):
        for p, key in enumerate(ratio_keys):
            neighbours = statistics.mean(runs[p]["docs_per_s"] for runs in peer_runs[i:i + 2])
            run[key] = run["docs_per_s"] / neighbours
    rows = [[f"ours, run {i + 1}", r["docs_per_s"], r["chunks_per_s"], r["embedded_tokens"], r["tokens_per_s"],
             r["padded_tokens"] / max(1, r["embedded_tokens"]), sum(r["cpu_seconds"].values()),
             *(r[key] for key in ratio_keys)] for i, r in enumerate(ours)]
    for p, peer in enumerate(peers):
        runs = [round_[p] for round_ in peer_runs]
        rows.append([f"sentence-transformers, {peer.name} (mean of {len(runs)})",
                     statistics.mean(r["docs_per_s"] for r in runs), statistics.mean(r["texts_per_s"] for r in runs),
                     peer.tokens, statistics.mean(r["tokens_per_s"] for r in runs), padded_tokens(peer) / peer.tokens,
                     statistics.mean(r["cpu_seconds"] for r in runs), *["-"] * len(peers)])
    print_table(f"ingestion, {len(texts)} SciFact abstracts ({args.layout}), {len(chunks)} chunks, "
                f"{args.threads} torch threads, embed service in {embed_dtype}",
                ["run", "docs/s", "texts/s", "tokens", "tokens/s", "padded/real", "cpu s",
                 *(f"vs {peer.name}" for peer in peers)], rows)
    if not args.save:
        return
    peer_summary = {peer.name: {"texts": len(peer.texts), "tokens": peer.tokens, "padded_tokens": padded_tokens(peer),
                                "batch_size": PEER_BATCH,
                                "docs_per_s": statistics.mean(r[p]["docs_per_s"] for r in peer_runs),
                                "runs": [r[p] for r in peer_runs]}
                    for p, peer in enumerate(peers)}
    workload = {"corpus": str(args.corpus), "docs": len(texts), "layout": args.layout, "chunks": len(chunks),
                "model": str(model_dir), "torch_threads": args.threads, "rounds": args.rounds,
                "embed_dtype": {"setting": args.embed_dtype, "resolved": embed_dtype},
                "cli": "scripts/ingest.py defaults (its run() called in this process)",
                "method": f"peer runs ({', '.join(peer.name for peer in peers)}) before and after each of our runs; "
                          "ratio = our docs/s over the mean of the peer runs either side; start-up excluded on both "
                          "sides"}
    path = save_result("ingest", workload=workload, ours=ours, peer=peer_summary)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
