"""Multi-LoRA cost: decode throughput of one batch whose requests use 1, 4 or 16 different adapters.

The base model (bundled SmolLM2-135M by default) serves the same batch of requests (same prompts, same
`max_tokens`, EOS ignored so every run generates the same token count) four ways in one process: with no LoRA
layers at all (the reference), and on an engine with LoRA slots where the requests are spread round-robin over
1, 4 and 16 adapters. The adapters are random PEFT-format adapters on every projection (rank `--rank`),
written to a temporary directory. Each configuration gets the same untimed warm-up; model load is outside the
timed region. Writes bench/results/llm_lora-*.json.

    python bench/llm_lora.py                      # 16 requests, 64 new tokens each, rank 8
    python bench/llm_lora.py --num-requests 32 --rank 16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.report import print_table, require_clean_tree, save_result
from common.model_files import bundled_llm
from services.llm.engine import EngineConfig, LLMEngine, SamplingParams

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF directory or .gguf (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--num-requests", type=int, default=16, help="requests in the batch")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--adapter-counts", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--allow-dirty", action="store_true", help="run even from uncommitted code")
    return parser.parse_args()


def write_random_adapter(directory: Path, engine: LLMEngine, rank: int, seed: int) -> Path:
    """A PEFT LoRA directory for the engine's model: every projection of every layer, small random A and B."""
    from safetensors.torch import save_file

    config = engine.model_config
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"q_proj": (config.hidden_size, q), "k_proj": (config.hidden_size, kv), "v_proj": (config.hidden_size, kv),
              "o_proj": (q, config.hidden_size), "gate_proj": (config.hidden_size, config.intermediate_size),
              "up_proj": (config.hidden_size, config.intermediate_size),
              "down_proj": (config.intermediate_size, config.hidden_size)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for name, (fan_in, fan_out) in shapes.items():
            owner = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{owner}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=generator) / fan_in ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=generator) * 0.01
    path = directory / f"adapter-{seed}"
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                          "target_modules": list(TARGETS), "bias": "none"}))
    return path


def timed(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, loras: list[str | None]) -> float:
    engine.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False,
                    lora_names=loras[:2])  # warm-up, untimed
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, use_tqdm=False, lora_names=loras)
    seconds = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == params.max_tokens for o in outputs)
    return seconds


def main() -> None:
    args = parse_args()
    if not args.allow_dirty:
        require_clean_tree()
    model = args.model or str(bundled_llm())
    common = dict(model=model, device="cpu", dtype=args.dtype, max_num_seqs=args.num_requests)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 20000, (args.prompt_tokens,), generator=generator).tolist()
               for _ in range(args.num_requests)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    tokens = args.num_requests * args.max_tokens
    results, rows = {}, []

    base = LLMEngine(EngineConfig(**common))
    seconds = timed(base, prompts, params, [None] * len(prompts))
    results["no_lora_layers"] = {"seconds": round(seconds, 3), "output_tok_s": tokens / seconds}
    rows.append(["none (no LoRA layers)", f"{tokens / seconds:.1f}", "1.00"])
    reference = tokens / seconds
    del base

    most = max(args.adapter_counts)
    engine = LLMEngine(EngineConfig(**common, max_loras=most, max_lora_rank=args.rank))
    with tempfile.TemporaryDirectory() as directory:
        for i in range(most):
            engine.load_lora(f"a{i}", str(write_random_adapter(Path(directory), engine, args.rank, seed=i)))
    for count in args.adapter_counts:
        loras: list[str | None] = [f"a{i % count}" for i in range(len(prompts))]
        seconds = timed(engine, prompts, params, loras)
        results[f"adapters_{count}"] = {"seconds": round(seconds, 3), "output_tok_s": tokens / seconds,
                                        "relative_to_no_lora": tokens / seconds / reference}
        rows.append([f"{count} adapter(s)", f"{tokens / seconds:.1f}", f"{tokens / seconds / reference:.2f}"])
    print_table(f"multi-LoRA: {args.num_requests} requests x {args.max_tokens} tokens, rank {args.rank}",
                ["adapters in the batch", "output tok/s", "vs no LoRA"], rows)
    workload = {"model": model, "num_requests": args.num_requests, "prompt_tokens": args.prompt_tokens,
                "max_tokens": args.max_tokens, "rank": args.rank, "targets": list(TARGETS), "dtype": str(engine.dtype),
                "note": "requests spread round-robin over the adapters; one batch, run to completion; warm-up "
                        "untimed for every configuration"}
    path = save_result("llm_lora", workload=workload, ours=results,
                       peer={"note": "the reference is our own engine without LoRA layers, in the same run"})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
