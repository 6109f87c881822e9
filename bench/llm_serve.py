"""Serving load generator for any OpenAI-compatible server: TTFT, ITL, TPOT, E2E, throughput and goodput.

Streaming clients send chat or completions requests, arriving at a fixed rate (Poisson, or gamma-distributed
gaps with `--burstiness` < 1 for bursts) and/or capped at a fixed concurrency. Workloads: `random` (prompt and
answer lengths drawn around `--input-len`/`--output-len`) and `rag` (3/4 of the context in, 1/8 out).

It can start our server (`--serve-ours`) and, in the same run, Hugging Face's `transformers serve
--continuous-batching` as the peer (`--serve-peer`), on the same model converted from the GGUF.

    python bench/llm_serve.py --serve-ours --serve-peer --concurrency 16 --num-requests 64 --output-len 64 --save
    python bench/llm_serve.py --base-url http://127.0.0.1:8000 --request-rate 4 --burstiness 0.5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import print_table, save_result  # noqa: E402
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


@dataclass(slots=True)
class RequestResult:
    ok: bool
    prompt_words: int
    max_tokens: int
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""

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


async def send_one(http: httpx.AsyncClient, endpoint: str, model: str, prompt: str, max_tokens: int,
                   ignore_eos: bool) -> RequestResult:
    result = RequestResult(ok=False, prompt_words=len(prompt.split()), max_tokens=max_tokens)
    body: dict[str, object] = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                               "stream_options": {"include_usage": True}}
    if ignore_eos:  # a vLLM extension; `transformers serve` rejects unknown fields
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    start = time.perf_counter()
    last = start
    pieces = 0
    usage_tokens = None
    try:
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    result.error = str(chunk["error"])[:200]
                    return result
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                text = "".join((c.get("delta") or {}).get("content") or c.get("text") or ""
                               for c in chunk.get("choices") or [])
                if not text:
                    continue
                now = time.perf_counter()
                if pieces == 0:
                    result.ttft = now - start
                else:
                    result.itls.append(now - last)
                last = now
                pieces += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e = time.perf_counter() - start
    result.output_tokens = usage_tokens if usage_tokens else pieces
    result.ok = pieces > 0
    if not result.ok:
        result.error = "no tokens streamed"
    return result


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
            results.append(await send_one(http, workload.endpoint, model, prompt, max_tokens,
                                          workload.ignore_eos))
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
    output_tokens = sum(r.output_tokens for r in done)

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(check: callable, process: subprocess.Popen, what: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


@contextmanager
def running(command: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextmanager
def our_server(model: Path, max_model_len: int | None, log_dir: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    env = {"LLM_HOST": "127.0.0.1", "LLM_PORT": str(port), "LLM_MODEL": str(model), "HF_HUB_OFFLINE": "1",
           "LLM_LOG_LEVEL": "warning"}
    if max_model_len:
        env["LLM_MAX_MODEL_LEN"] = str(max_model_len)
    url = f"http://127.0.0.1:{port}"
    log_path = log_dir / "llm_serve-ours.log"
    with running([sys.executable, "-m", "services.llm"], env, log_path) as process:
        wait_for(lambda: httpx.get(url + "/v1/health/ready").status_code == 200, process, "our server", 600,
                 log_path)
        yield url, httpx.get(url + "/v1/models").json()["data"][0]["id"]


def peer_model_dir(gguf: Path, cache: Path) -> Path:
    """The GGUF as a Hugging Face safetensors directory (`transformers serve` refuses a local .gguf)."""
    target = cache / gguf.stem
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"converting {gguf.name} to safetensors for the peer server in {target}")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fresh = LlamaForCausalLM(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    staging = cache / f"{gguf.stem}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    fresh.save_pretrained(staging)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    staging.rename(target)
    return target


@contextmanager
def peer_server(model_dir: Path, log_dir: Path) -> Iterator[tuple[str, str]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    executable = Path(sys.executable).parent / "transformers"
    command = [str(executable), "serve", str(model_dir), "--continuous-batching", "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port)]
    log_path = log_dir / "llm_serve-peer.log"

    def answers() -> bool:
        probe = {"model": str(model_dir), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        return httpx.post(url + "/v1/chat/completions", json=probe, timeout=120).status_code == 200

    with running(command, {"HF_HUB_OFFLINE": "1"}, log_path) as process:
        wait_for(answers, process, "transformers serve", 600, log_path)
        yield url, str(model_dir)


def server_context_len(base_url: str, api_key: str | None) -> int | None:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        card = httpx.get(base_url + "/v1/models", headers=headers, timeout=10).json()["data"][0]
        return int(card["max_model_len"]) if "max_model_len" in card else None
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


def measure(label: str, url: str, model: str, workload: Workload, context_len: int, args: argparse.Namespace
            ) -> dict[str, object]:
    requests = build_requests(workload, context_len)
    warmup = Workload(**{**asdict(workload), "num_requests": min(2, workload.num_requests), "concurrency": 2,
                         "request_rate": None})
    asyncio.run(run_load(url, model, warmup, requests[:2], args.api_key, f"{label} warm-up"))
    results, duration = asyncio.run(run_load(url, model, workload, requests, args.api_key, label))
    return summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms, len(requests))


def table_rows(label: str, summary: dict) -> list[object]:
    return [label, summary["completed"], summary["failed"], summary["unfinished"], summary["request_throughput_rps"],
            summary["output_throughput_tok_s"], summary["goodput_rps"], summary["ttft_ms"]["p50"],
            summary["ttft_ms"]["p99"], summary["tpot_ms"]["p50"], summary["itl_ms"]["p50"], summary["itl_ms"]["p99"],
            summary["e2e_ms"]["p50"]]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = parser.add_argument_group("servers")
    target.add_argument("--base-url", help="an OpenAI-compatible server to load (instead of --serve-ours)")
    target.add_argument("--model", help="model id to request (default: the server's first /v1/models entry)")
    target.add_argument("--api-key", default=os.environ.get("API_KEY"))
    target.add_argument("--serve-ours", action="store_true", help="start `python -m services.llm` for the run")
    target.add_argument("--serve-peer", action="store_true",
                        help="also start `transformers serve --continuous-batching` on the same model")
    target.add_argument("--gguf", type=Path, default=None, help="model for the servers we start (default: bundled)")
    target.add_argument("--peer-cache", type=Path, default=Path("/tmp/llm_serve_peer"),
                        help="where the converted peer model is kept between runs")
    target.add_argument("--max-model-len", type=int, default=2048, help="context of our server (and rag sizing)")
    load = parser.add_argument_group("load")
    load.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    load.add_argument("--workload", choices=["random", "rag"], default="random")
    load.add_argument("--num-requests", type=int, default=64)
    load.add_argument("--input-len", type=int, default=128, help="random workload: prompt length in words")
    load.add_argument("--output-len", type=int, default=64, help="random workload: answer length in tokens")
    load.add_argument("--range-ratio", type=float, default=0.5, help="random workload: lengths vary by ±this")
    load.add_argument("--concurrency", type=int, default=None, help="most requests in flight at once")
    load.add_argument("--request-rate", type=float, default=None, help="arrivals per second (default: all at once)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps; 1 is Poisson")
    load.add_argument("--max-seconds", type=float, default=600.0, help="stop the run after this long")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--ignore-eos", action="store_true",
                      help="ask for exactly max_tokens (servers that know vLLM's ignore_eos; not the peer)")
    load.add_argument("--slo-ttft-ms", type=float, default=None)
    load.add_argument("--slo-tpot-ms", type=float, default=None)
    parser.add_argument("--save", action="store_true", help="write bench/results/llm_serve-<device>-<date>.json")
    args = parser.parse_args(argv)
    if not args.base_url and not args.serve_ours and not args.serve_peer:
        parser.error("give --base-url, --serve-ours or --serve-peer")
    return args


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    workload = Workload(kind=args.workload, endpoint=args.endpoint, num_requests=args.num_requests,
                        input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                        concurrency=args.concurrency, request_rate=args.request_rate, burstiness=args.burstiness,
                        max_seconds=args.max_seconds, seed=args.seed, ignore_eos=args.ignore_eos)
    gguf = args.gguf or bundled_llm()
    log_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    figures: dict[str, dict[str, object]] = {}

    if args.base_url:
        context = server_context_len(args.base_url, args.api_key) or args.max_model_len
        model = args.model or httpx.get(args.base_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        figures["target"] = measure("target", args.base_url, model, workload, context, args)
    if args.serve_ours:
        with our_server(gguf, args.max_model_len, log_dir) as (url, model):
            figures["ours"] = measure("ours", url, model, workload, args.max_model_len, args)
    if args.serve_peer:
        with peer_server(peer_model_dir(gguf, args.peer_cache), log_dir) as (url, model):
            figures["peer"] = measure("transformers serve", url, model, workload, args.max_model_len, args)

    header = ["server", "done", "failed", "cut off", "req/s", "out tok/s", "goodput req/s", "TTFT p50 ms",
              "TTFT p99 ms", "TPOT p50 ms", "ITL p50 ms", "ITL p99 ms", "E2E p50 ms"]
    shape = f"{workload.kind}, {workload.endpoint}, {workload.num_requests} requests, " + (
        f"concurrency {workload.concurrency}" if workload.concurrency else f"rate {workload.request_rate}/s")
    print_table(f"LLM serving ({shape})", header, [table_rows(label, s) for label, s in figures.items()])
    for label, summary in figures.items():
        if summary["errors"]:
            print(f"{label} errors: {summary['errors']}")
    if "ours" in figures and "peer" in figures:
        ours, peer = figures["ours"], figures["peer"]
        ratio = ours["output_throughput_tok_s"] / max(peer["output_throughput_tok_s"], 1e-9)
        print(f"\nours / transformers serve output tok/s: {ratio:.2f}x")
        figures["ratio_output_throughput"] = ratio  # type: ignore[assignment]
    if args.save:
        workload_record = {**asdict(workload), "model": gguf.name, "max_model_len": args.max_model_len,
                           "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms,
                           "peer_command": "transformers serve <converted dir> --continuous-batching --device cpu"}
        path = save_result("llm_serve", workload=workload_record, ours=figures.get("ours") or figures.get("target"),
                           peer=figures.get("peer"), extra={"ratio_output_throughput":
                                                            figures.get("ratio_output_throughput")})
        print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
