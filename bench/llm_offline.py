"""Offline LLM throughput: our engine vs Hugging Face transformers on the same model, prompts and lengths.

N requests with prompt and output lengths drawn at random in the given ranges (random token ids, EOS
ignored so output lengths hold). transformers runs `generate` with static batches (left padding; each batch
generates to its longest output, only the requested tokens count as useful), swept over `--hf-batch-sizes`
with the best one reported, and, where the installed version has it, its continuous-batching manager with
each request's own `max_new_tokens`. Every system is treated alike: same dtype and torch threads, one
untimed warm-up request each, and start-up (model load, manager start) outside the timed region. Both load
the same dense weights: a GGUF (the bundled Q4_1 SmolLM2 by default) is converted once to a safetensors
directory and that directory is what both sides load, since transformers would otherwise keep GGUF weights
packed and compute every matmul through a float32 cast. Writes bench/results/llm_offline-*.json.

    python bench/llm_offline.py                      # CPU defaults: bundled SmolLM2-135M, 32 requests
    python bench/llm_offline.py --num-requests 16 --prompt-len 32 256 --output-len 16 128
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.llm_servers import convert_gguf
from bench.report import print_table, require_clean_tree, save_result
from common.model_files import bundled_llm
from services.llm.engine import EngineConfig, LLMEngine, SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF directory or .gguf (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--model-cache", type=Path, default=Path("/tmp/llm_serve_models"),
                        help="where a GGUF converted to safetensors is kept between runs (shared with llm_serve)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[64, 512], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--dtype", default="auto",
                        help="dtype for both sides (auto: our hardware profile's choice, given to transformers too)")
    parser.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32],
                        help="static batch sizes swept for transformers generate; the best is the peer's figure")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for both sides (0: torch's default, one per core)")
    parser.add_argument("--skip-hf", action="store_true", help="measure only our engine")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow-dirty", action="store_true", help="run even from uncommitted code")
    return parser.parse_args()


def make_workload(args: argparse.Namespace, vocab_size: int, special: set[int]) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(args.seed)
    ordinary = [t for t in range(vocab_size) if t not in special]
    prompts = [[rng.choice(ordinary) for _ in range(rng.randint(*args.prompt_len))] for _ in range(args.num_requests)]
    outputs = [rng.randint(*args.output_len) for _ in range(args.num_requests)]
    return prompts, outputs


def figures(seconds: float, prompt_tokens: int, useful_output: int, generated: int | None = None) -> dict:
    result = {"seconds": round(seconds, 3), "output_tok_s": useful_output / seconds,
              "total_tok_s": (prompt_tokens + useful_output) / seconds, "useful_output_tokens": useful_output}
    if generated is not None:
        result["generated_tokens"] = generated
    return result


# Every system gets the same untimed warm-up: one short request through the path it is then timed on.
WARM_UP_PROMPT_TOKENS, WARM_UP_OUTPUT_TOKENS = 16, 4


def run_ours(engine: LLMEngine, prompts: list[list[int]], outputs: list[int]) -> dict:
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in outputs]
    engine.generate([prompts[0][:WARM_UP_PROMPT_TOKENS]],
                    SamplingParams(max_tokens=WARM_UP_OUTPUT_TOKENS, temperature=0.0, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    results = engine.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    assert produced == sum(outputs), "ignore_eos must make every request produce its max_tokens"
    stats = engine.stats()
    return figures(seconds, sum(map(len, prompts)), produced) | {"preemptions": stats.num_preemptions}


def _hf_static_batch(model: torch.nn.Module, batch: list[list[int]], steps: int, pad_id: int) -> int:
    width = max(map(len, batch))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    # min_new_tokens keeps EOS out, as ignore_eos does on our side.
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, pad_token_id=pad_id)
    return (out.shape[1] - width) * len(batch)


def run_hf_static(model: torch.nn.Module, prompts: list[list[int]], outputs: list[int], batch_size: int,
                  pad_id: int) -> dict:
    generated = 0
    with torch.inference_mode():
        _hf_static_batch(model, [prompts[0][:WARM_UP_PROMPT_TOKENS]], WARM_UP_OUTPUT_TOKENS, pad_id)
        start = time.perf_counter()
        for first in range(0, len(prompts), batch_size):
            batch, wants = prompts[first:first + batch_size], outputs[first:first + batch_size]
            generated += _hf_static_batch(model, batch, max(wants), pad_id)
        seconds = time.perf_counter() - start
    return figures(seconds, sum(map(len, prompts)), sum(outputs), generated) | {"batch_size": batch_size}


def run_hf_static_sweep(model: torch.nn.Module, prompts: list[list[int]], outputs: list[int],
                        batch_sizes: list[int], pad_id: int) -> dict:
    """Static batching at each size; the peer's figure is its best size, all sizes are kept in `sweep`."""
    sweep = {size: run_hf_static(model, prompts, outputs, size, pad_id) for size in sorted(set(batch_sizes))}
    for size, result in sweep.items():
        print(f"  transformers static generate, batch {size}: {result['output_tok_s']:.1f} output tok/s")
    best = max(sweep.values(), key=lambda r: r["output_tok_s"])
    return best | {"sweep": {str(size): result["output_tok_s"] for size, result in sweep.items()}}


def run_hf_continuous(model: torch.nn.Module, prompts: list[list[int]], outputs: list[int]) -> dict:
    """transformers' continuous-batching manager (what `generate_batch` drives), each request with its own
    max_new_tokens and EOS disabled; the manager's start-up and a warm-up request stay outside the timing."""
    from transformers import GenerationConfig

    if not hasattr(model, "continuous_batching_context_manager"):
        return {"error": "this transformers has no continuous batching"}
    config = GenerationConfig(max_new_tokens=max(outputs), do_sample=False, eos_token_id=-1, pad_token_id=0)
    try:
        # No inference_mode here: the manager updates its own tensors from a worker thread.
        with model.continuous_batching_context_manager(generation_config=config, block=True, timeout=30) as manager:
            warm_up = manager.add_request(prompts[0][:WARM_UP_PROMPT_TOKENS], request_id="warm-up",
                                          max_new_tokens=WARM_UP_OUTPUT_TOKENS, eos_token_id=-1)
            _wait_for(manager, {warm_up})
            start = time.perf_counter()
            ids = {manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n, eos_token_id=-1)
                   for i, (prompt, n) in enumerate(zip(prompts, outputs, strict=True))}
            results = _wait_for(manager, ids, progress=True)
            seconds = time.perf_counter() - start
    except Exception as failure:
        traceback.print_exc()
        return {"error": f"{type(failure).__name__}: {failure}"}
    generated = sum(len(r.generated_tokens) for r in results.values())
    if generated != sum(outputs):
        return {"error": f"the manager returned {generated} of {sum(outputs)} tokens (see its log)"}
    return figures(seconds, sum(map(len, prompts)), sum(outputs), generated)


def _wait_for(manager: object, request_ids: set[str], progress: bool = False) -> dict:
    from tqdm import tqdm

    results = {}
    with tqdm(total=len(request_ids), desc="transformers continuous", disable=not progress) as bar:
        while len(results) < len(request_ids):
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("the continuous-batching thread stopped")
                continue
            if result.request_id in request_ids and result.is_finished():
                results[result.request_id] = result
                bar.update(1)
    return results


def load_hf(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args()
    if not args.allow_dirty:
        require_clean_tree()  # the result it writes is evidence only for committed code
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Path(args.model) if args.model else bundled_llm()
    model_dir = convert_gguf(model, args.model_cache) if model.suffix == ".gguf" else model
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed))
    dtype = engine.dtype
    special = set(engine.tokenizer.all_special_ids) | engine.eos_token_ids
    prompts, outputs = make_workload(args, engine.model_config.vocab_size, special)
    workload = {"model": model.name, "weights": "dense safetensors, the same directory on every side",
                "num_requests": args.num_requests, "prompt_len": args.prompt_len,
                "output_len": args.output_len, "prompt_tokens": sum(map(len, prompts)),
                "output_tokens": sum(outputs), "dtype": str(dtype), "device": str(engine.device),
                "hardware_profile": engine.hardware.profile, "torch_threads": torch.get_num_threads(),
                "hf_batch_sizes": args.hf_batch_sizes, "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "fairness": "same dtype and threads; one untimed warm-up request per system; start-up untimed; "
                            "per-request output lengths everywhere (static batches pad to their longest)"}
    ours = run_ours(engine, prompts, outputs)
    peer: dict = {}
    if not args.skip_hf:
        del engine
        hf = load_hf(model_dir, dtype)
        pad_id = hf.generation_config.pad_token_id or 0
        peer["static_generate"] = run_hf_static_sweep(hf, prompts, outputs, args.hf_batch_sizes, pad_id)
        peer["continuous_batching"] = run_hf_continuous(hf, prompts, outputs)
    rows = [["ours (LLMEngine)", ours["seconds"], ours["output_tok_s"], ours["total_tok_s"], "1.00"]]
    for name, result in peer.items():
        label = f"transformers {name}" + (f" (batch {result['batch_size']})" if "batch_size" in result else "")
        if "error" in result:
            rows.append([label, "failed", result["error"][:60], "", ""])
        else:
            rows.append([label, result["seconds"], result["output_tok_s"], result["total_tok_s"],
                         f"{ours['output_tok_s'] / result['output_tok_s']:.2f}"])
    print_table(f"LLM offline throughput, {args.num_requests} requests, {workload['prompt_tokens']} prompt + "
                f"{workload['output_tokens']} output tokens, {dtype}", ["system", "seconds", "output tok/s",
                                                                         "total tok/s", "ours / it"], rows)
    ratios = {name: ours["output_tok_s"] / r["output_tok_s"] for name, r in peer.items() if "error" not in r}
    path = save_result("llm_offline", workload=workload, ours=ours, peer=peer,
                       extra={"output_tok_s_ratio_ours_over_peer": ratios})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
