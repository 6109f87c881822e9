"""Engine and server smoke test on a random-weight model of a real shape (`bench/gpu_check.sh` runs it).

Builds Llama-3-8B's shape (hidden 4096, 32 query / 8 KV heads of 128, intermediate 14336, vocabulary 128256,
8k context) with `--layers` decoder layers (every layer has the same shape, so a few exercise every kernel)
and random weights, and saves it as a Hugging Face directory with a word-level tokenizer over the whole
vocabulary. (Not the compose default's Qwen2.5-7B shape: transformers swaps any tokenizer of a `qwen2`
directory for Qwen's own byte-level one, which a synthetic vocabulary cannot feed; bench/kernels_compile.py
covers that shape's kernels.) Then:

1. engine: starts on the device (hardware profile, KV budget from the memory share, CUDA graphs), generates
   greedy completions for a batch of prompts and reports start-up time and output tokens per second; a second
   engine with graphs off generates the same prompts and the share of equal tokens is reported (random
   weights give near-tied logits, so bf16 rounding differences between graph and eager split counts may flip
   some: this is reported, the exact comparison is tests/gpu's, in fp32);
2. fp8: an engine with fp8 weights and an fp8 KV cache (`LLM_QUANTIZATION=fp8`, `LLM_KV_CACHE_DTYPE=fp8`) on
   the same prompts: start-up, output tokens per second, the KV pool's capacity and gain over bf16, and the
   share of its first tokens equal to the bf16 engine's (skipped, and said so, below compute capability 8.9);
3. server: `python -m services.llm` over the same directory, ready probe, a chat completion, a streamed
   completion and `/v1/models`, then SIGTERM;
4. decode: batch-1 greedy decode with CUDA graphs on and off, tokens per second against the bandwidth limit:
   the device's measured copy bandwidth over the bytes one token must read (every weight but the input
   embedding table, of which one row is read, plus the KV cache at the mean context). The time per token is
   the difference between a long and a short generation of the same prompt over their difference in tokens,
   so prefill and per-request costs cancel out.

`--steps` picks the steps (the model is always built first): `gpu_check.sh` runs the default four on a
4-layer model, then `decode` alone on the full 32-layer shape (16 GB of weights) when time is left.

Writes OUT/smoke.json (`--report`) and OUT/server.log; exits 1 when a step fails. `--tiny` runs the same steps on
the CPU with a tiny shape (what `gpu_check.sh` does without a GPU, to prove the script itself).

    python bench/gpu_smoke.py --out OUT [--layers 4]
    python bench/gpu_smoke.py --out OUT --layers 32 --steps decode --report decode-32.json
    python bench/gpu_smoke.py --out OUT --tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
             "vocab_size": 128256, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 512, "max_position_embeddings": 1024, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}


def save_random_model(directory: Path, shape: dict[str, Any], layers: int, device: str) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, **shape)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)  # random init on the device: seconds, not minutes
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    release_device_memory()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {f"w{i}": i for i in range(4, shape["vocab_size"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(directory)
    return directory


def prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(4, vocab, (count, length), generator=gen).tolist()


def release_device_memory() -> None:
    """Frees what a deleted engine held: its parts refer to each other, so only the cycle collector frees them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


FIRST_TOKENS = 8  # of each of the first 8 completions, kept in the report to compare the fp8 engine's with


def workload(device: str) -> tuple[int, int, int]:
    """(prompts, prompt tokens, output tokens) of the engine steps."""
    return (64, 128, 128) if device == "cuda" else (4, 16, 8)


def engine_step(model_dir: Path, device: str, shape: dict[str, Any]) -> dict[str, Any]:
    from services.llm.engine import EngineConfig, LLMEngine, SamplingParams

    result: dict[str, Any] = {}
    batch, length, new = workload(device)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=device))
    result["start_s"] = round(time.perf_counter() - started, 1)
    result["hardware"] = engine.hardware.describe()
    result["kv_blocks"] = engine.block_manager.num_blocks
    result["kv_tokens"] = engine.block_manager.num_blocks * engine.block_size
    result["cuda_graphs"] = engine.runner.decode_graphs is not None
    if device == "cuda":
        result["gpu_memory_gib"] = {"allocated": round(torch.cuda.memory_allocated() / 2**30, 2),
                                    "reserved": round(torch.cuda.memory_reserved() / 2**30, 2)}
    work = prompts(batch, length, shape["vocab_size"])
    engine.generate(work[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = engine.generate(work, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    graph_tokens = [o.outputs[0].token_ids for o in outputs[:8]]
    result["first_tokens"] = [tokens[:FIRST_TOKENS] for tokens in graph_tokens]
    assert all(len(o.outputs[0].token_ids) == new for o in outputs), "a completion came back short"
    result["generate"] = {"prompts": batch, "prompt_tokens": length, "output_tokens": new,
                          "seconds": round(seconds, 2), "output_tokens_per_s": round(batch * new / seconds, 1)}
    del engine, outputs
    release_device_memory()
    if device == "cuda":
        eager = LLMEngine(EngineConfig(model=str(model_dir), device=device, enable_cuda_graphs=False))
        eager_tokens = [o.outputs[0].token_ids for o in eager.generate(work[:8], params, use_tqdm=False)]
        same = sum(a == b for x, y in zip(graph_tokens, eager_tokens, strict=True) for a, b in zip(x, y, strict=True))
        result["graphs_vs_eager_equal_tokens"] = f"{same}/{8 * new}"
        del eager
        release_device_memory()
    return result


def fp8_step(model_dir: Path, device: str, shape: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The engine step's workload with fp8 weights and KV cache; `baseline`: the engine step's result."""
    from services.llm.engine import EngineConfig, LLMEngine, SamplingParams

    if device == "cuda" and torch.cuda.get_device_capability() < (8, 9):
        return {"skipped": f"fp8 needs compute capability 8.9+, this GPU is {torch.cuda.get_device_capability()}"}
    batch, length, new = workload(device)
    params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    work = prompts(batch, length, shape["vocab_size"])
    started = time.perf_counter()
    engine = LLMEngine(EngineConfig(model=str(model_dir), device=device, quantization="fp8", kv_cache_dtype="fp8"))
    result: dict[str, Any] = {"start_s": round(time.perf_counter() - started, 1),
                              "kv_cache": engine.kv_cache_capacity()}
    engine.generate(work[:2], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = engine.generate(work, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == new for o in outputs), "a completion came back short"
    result["output_tokens_per_s"] = round(batch * new / seconds, 1)
    if "first_tokens" in baseline:
        # Random weights leave near-tied logits, so fp8's rounding flips some tokens: reported, not judged.
        ours = [o.outputs[0].token_ids[:FIRST_TOKENS] for o in outputs[:len(baseline["first_tokens"])]]
        same = sum(a == b for a, b in zip(ours, baseline["first_tokens"], strict=True))
        result["prompts_with_the_model_dtype_first_tokens"] = f"{same}/{len(ours)} (first {FIRST_TOKENS} tokens)"
    del engine, outputs
    release_device_memory()
    return result


def decode_step(model_dir: Path, device: str, shape: dict[str, Any]) -> dict[str, Any]:
    """Batch-1 greedy decode with CUDA graphs on and off, against the bandwidth limit (module docstring, 4)."""
    from bench.kernels import Timer, copy_bandwidth
    from services.llm.engine import EngineConfig, LLMEngine, SamplingParams
    from services.llm.engine.runner import kv_bytes_per_block

    dev = torch.device(device)
    copy_bw = copy_bandwidth(dev, Timer(dev, repeats=10), 2 * 2**30 if device == "cuda" else 64 * 2**20)
    prompt_tokens, short, long = (128, 32, 288) if device == "cuda" else (16, 4, 12)
    [prompt] = prompts(1, prompt_tokens, shape["vocab_size"])
    result: dict[str, Any] = {"prompt_tokens": prompt_tokens, "output_tokens": [short, long],
                              "copy_bandwidth_gb_per_s": round(copy_bw / 1e9, 1)}
    for graphs in ((True, False) if device == "cuda" else (False,)):
        engine = LLMEngine(EngineConfig(model=str(model_dir), device=device, enable_cuda_graphs=graphs))
        c = engine.runner.config  # bytes from the shape: the CPU path repacks its weights
        attention = c.hidden_size * (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # q, k, v and o
        layer = attention + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size  # + the two norms
        # Every layer, the final norm and the output projection (tied or not); of the embedding table, one row.
        weight_bytes = (c.num_layers * layer + c.hidden_size + c.vocab_size * c.hidden_size) * engine.dtype.itemsize
        mean_context = prompt_tokens + (short + long) / 2
        bytes_per_token = weight_bytes + kv_bytes_per_block(c, 1, engine.kv_dtype) * mean_context  # KV of one token
        engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
        seconds = {}
        for tokens in (short, long):
            params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
            runs = []
            for _ in range(3):
                started = time.perf_counter()
                [output] = engine.generate([prompt], params, use_tqdm=False)
                runs.append(time.perf_counter() - started)
                assert len(output.outputs[0].token_ids) == tokens, "a completion came back short"
            seconds[tokens] = min(runs)
        per_token = (seconds[long] - seconds[short]) / (long - short)
        limit = copy_bw / bytes_per_token
        result["graphs" if graphs else "eager"] = {
            "ms_per_token": round(per_token * 1e3, 3), "tokens_per_s": round(1 / per_token, 1),
            "limit_tokens_per_s": round(limit, 1), "pct_of_limit": round(100 / per_token / limit, 1),
            "bytes_per_token_gb": round(bytes_per_token / 1e9, 3), "best_of_3_seconds": seconds}
        del engine
        release_device_memory()
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ok(response: Any) -> Any:
    """The response's JSON, or an error that carries the server's message."""
    if response.status_code >= 400:
        raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.status_code} "
                           f"{response.text[:500]}")
    return response.json()


def server_step(model_dir: Path, device: str, out: Path, ready_timeout: float) -> dict[str, Any]:
    import httpx

    port = free_port()
    env = {**os.environ, "LLM_MODEL": str(model_dir), "LLM_PORT": str(port), "LLM_HOST": "127.0.0.1",
           "LLM_DEVICE": device, "HF_HUB_OFFLINE": "1"}
    result: dict[str, Any] = {}
    with open(out / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "services.llm"], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.perf_counter()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
            try:
                if httpx.get(f"{base}/v1/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > ready_timeout:
                raise TimeoutError(f"not ready after {ready_timeout:.0f}s")
            time.sleep(1)
        result["ready_s"] = round(time.perf_counter() - started, 1)
        with httpx.Client(base_url=base, timeout=120) as client:
            card = _ok(client.get("/v1/models"))["data"][0]
            result["model"] = {"id": card["id"], "hardware": card.get("hardware")}
            chat = _ok(client.post("/v1/chat/completions", json={
                "model": card["id"], "max_tokens": 16, "temperature": 0,
                "messages": [{"role": "user", "content": "w10 w11 w12 w13"}]}))
            assert chat["usage"]["completion_tokens"] >= 1 and chat["choices"][0]["finish_reason"] in ("stop", "length")
            result["chat"] = {"usage": chat["usage"], "finish_reason": chat["choices"][0]["finish_reason"]}
            chunks = 0
            with client.stream("POST", "/v1/completions", json={"model": card["id"], "prompt": "w20 w21 w22",
                                                                  "max_tokens": 16, "stream": True}) as stream:
                stream.raise_for_status()
                lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
            chunks = len(lines) - 1
            assert lines[-1] == "data: [DONE]" and chunks >= 1, lines[-3:]
            result["stream"] = {"chunks": chunks}
    finally:
        server.terminate()
        try:
            result["exit_code"] = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            result["exit_code"] = server.wait()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for smoke.json and server.log")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the random model (default 4)")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on the CPU (the dry run without a GPU)")
    parser.add_argument("--ready-timeout", type=float, default=300, help="seconds the server gets to become ready")
    parser.add_argument("--steps", default="engine,fp8,server,decode",
                        help="comma-separated steps after building the model (default: all four)")
    parser.add_argument("--report", default="smoke.json", help="the report's file name under --out")
    args = parser.parse_args()
    # The engine's start-up log (hardware profile, warm-up peak, KV budget) goes with the report.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: use --tiny for the CPU dry run")
    device, shape = ("cpu", TINY) if args.tiny else ("cuda", LLAMA3_8B)
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": device, "shape": shape, "layers": args.layers, "steps": {}}
    scratch = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # the weights never touch the disk
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-", dir=scratch) as tmp:
        steps = [("model", lambda: {"dir": str(save_random_model(Path(tmp) / "model", shape, args.layers, device))}),
                 ("engine", lambda: engine_step(Path(tmp) / "model", device, shape)),
                 ("fp8", lambda: fp8_step(Path(tmp) / "model", device, shape, report["steps"].get("engine", {}))),
                 ("server", lambda: server_step(Path(tmp) / "model", device, args.out, args.ready_timeout)),
                 ("decode", lambda: decode_step(Path(tmp) / "model", device, shape))]
        wanted = {"model", *args.steps.split(",")}
        unknown = wanted - {name for name, _ in steps}
        if unknown:
            parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
        for name, step in [(name, step) for name, step in steps if name in wanted]:
            started = time.perf_counter()
            try:
                report["steps"][name] = {"ok": True, **step()}
            except Exception as exc:  # the report says which step broke and how; later steps still try
                traceback.print_exc()
                report["steps"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            report["steps"][name]["seconds"] = round(time.perf_counter() - started, 1)
            print(f"{name}: {'ok' if report['steps'][name]['ok'] else 'FAILED'} "
                  f"({report['steps'][name]['seconds']}s)", flush=True)
            if name == "model" and not report["steps"][name]["ok"]:
                break
    (args.out / args.report).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(json.dumps(report, indent=2, default=str))
    return 0 if all(step["ok"] for step in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
