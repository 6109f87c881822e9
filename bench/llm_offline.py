"""Offline LLM throughput: our engine vs Hugging Face transformers on the same model, prompts and lengths.

N requests with prompt and output lengths drawn at random in the given ranges (random token ids,
`ignore_eos` so output lengths hold). transformers runs `generate` with static batches (left padding; each
batch must generate to its longest output, only the requested tokens count as useful) and, where the
installed version has it, its continuous-batching `generate_batch`. Writes bench/results/llm_offline-*.json.

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

from bench.report import print_table, save_result
from common.model_files import bundled_llm
from services.llm.engine import EngineConfig, LLMEngine, SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF directory or .gguf (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[64, 512], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--hf-batch-size", type=int, default=8, help="static batch size for transformers generate")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads for both sides (0: torch's default, one per core)")
    parser.add_argument("--skip-hf", action="store_true", help="measure only our engine")
    parser.add_argument("--seed", type=int, default=0)
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


def run_ours(engine: LLMEngine, prompts: list[list[int]], outputs: list[int]) -> dict:
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in outputs]
    engine.generate([prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    results = engine.generate(prompts, params, use_tqdm=True)
    seconds = time.perf_counter() - start
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    assert produced == sum(outputs), "ignore_eos must make every request produce its max_tokens"
    stats = engine.stats()
    return figures(seconds, sum(map(len, prompts)), produced) | {"preemptions": stats.num_preemptions}


def run_hf_static(model: torch.nn.Module, prompts: list[list[int]], outputs: list[int], batch_size: int,
                  pad_id: int) -> dict:
    generated = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(prompts), batch_size):
            batch, wants = prompts[first:first + batch_size], outputs[first:first + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            steps = max(wants)
            # min_new_tokens keeps EOS out, as ignore_eos does on our side.
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                                 do_sample=False, pad_token_id=pad_id)
            generated += (out.shape[1] - width) * len(batch)
    seconds = time.perf_counter() - start
    return figures(seconds, sum(map(len, prompts)), sum(outputs), generated)


def run_hf_generate_batch(model: torch.nn.Module, prompts: list[list[int]], outputs: list[int]) -> dict:
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"error": "this transformers has no generate_batch"}
    # One GenerationConfig serves the whole batch, so every request generates the longest output.
    config = GenerationConfig(max_new_tokens=max(outputs), min_new_tokens=max(outputs), do_sample=False,
                              eos_token_id=model.generation_config.eos_token_id, pad_token_id=0)
    try:
        start = time.perf_counter()
        # No inference_mode here: generate_batch updates its own tensors from a worker thread.
        results = model.generate_batch(inputs=prompts, generation_config=config, progress_bar=True)
        seconds = time.perf_counter() - start
    except Exception as failure:
        traceback.print_exc()
        return {"error": f"{type(failure).__name__}: {failure}"}
    generated = sum(len(r.generated_tokens) for r in results.values())
    if generated < sum(outputs):
        return {"error": f"generate_batch returned {generated} of {sum(outputs)} tokens (see its log)"}
    return figures(seconds, sum(map(len, prompts)), sum(outputs), generated)


def load_hf(model_path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    path = Path(model_path)
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = args.model or str(bundled_llm())
    engine = LLMEngine(EngineConfig(model=model_path, max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed))
    special = set(engine.tokenizer.all_special_ids) | engine.eos_token_ids
    prompts, outputs = make_workload(args, engine.model_config.vocab_size, special)
    workload = {"model": Path(model_path).name, "num_requests": args.num_requests, "prompt_len": args.prompt_len,
                "output_len": args.output_len, "prompt_tokens": sum(map(len, prompts)),
                "output_tokens": sum(outputs), "dtype": str(engine.dtype), "device": str(engine.device),
                "torch_threads": torch.get_num_threads(), "hf_batch_size": args.hf_batch_size,
                "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens}
    ours = run_ours(engine, prompts, outputs)
    peer: dict = {}
    if not args.skip_hf:
        del engine
        hf = load_hf(model_path)
        pad_id = hf.generation_config.pad_token_id or 0
        peer["static_generate"] = run_hf_static(hf, prompts, outputs, args.hf_batch_size, pad_id)
        peer["generate_batch"] = run_hf_generate_batch(hf, prompts, outputs)
    rows = [["ours (LLMEngine)", ours["seconds"], ours["output_tok_s"], ours["total_tok_s"], "1.00"]]
    for name, result in peer.items():
        if "error" in result:
            rows.append([f"transformers {name}", "failed", result["error"][:60], "", ""])
        else:
            rows.append([f"transformers {name}", result["seconds"], result["output_tok_s"], result["total_tok_s"],
                         f"{ours['output_tok_s'] / result['output_tok_s']:.2f}"])
    print_table(f"LLM offline throughput, {args.num_requests} requests, {workload['prompt_tokens']} prompt + "
                f"{workload['output_tokens']} output tokens", ["system", "seconds", "output tok/s", "total tok/s",
                                                                "ours / it"], rows)
    ratios = {name: ours["output_tok_s"] / r["output_tok_s"] for name, r in peer.items() if "error" not in r}
    path = save_result("llm_offline", workload=workload, ours=ours, peer=peer,
                       extra={"output_tok_s_ratio_ours_over_peer": ratios})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
