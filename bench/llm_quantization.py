"""Quantized weights and KV cache against the dtype's own: perplexity on SQuAD paragraphs, and int8's decode speed
on CPU.

For each dtype (fp32, bf16) the bundled model (or `--model`) is loaded with `quantization=none`, `int8` and `fp8`.
Quality: perplexity over the first `--num-paragraphs` paragraphs of the shared SQuAD dev articles, each scored
on its own (one prefill, every next token, its attention reading the KV cache), for int8 weights, fp8 (e4m3)
weights, an fp8 KV cache over the dtype's weights, and fp8 weights with an fp8 KV cache. Speed (int8 only,
`--no-speed` skips it): the same prompts (the first paragraphs, as plain text), `--max-tokens` new tokens each
with EOS ignored, at batch 1 and batch 8, one untimed warm-up per engine, model load outside the timed region;
int8 and its baseline alternate per batch size in one process.
Writes bench/results/llm_quantization-*.json (with `--no-speed`: llm_quantization_quality-*.json). Needs
../shared/eval/squad.

    python bench/llm_quantization.py
    python bench/llm_quantization.py --dtypes bfloat16 --num-paragraphs 16
    python bench/llm_quantization.py --num-paragraphs 12 --no-speed   # quality only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.report import print_table, require_clean_tree, save_result
from bench.squad_prompts import SQUAD
from common.model_files import bundled_llm
from services.llm.engine import EngineConfig, LLMEngine, SamplingParams
from services.llm.kernels.kv_store import FP8_KV_DTYPE
from services.llm.loader import load_model, resolve_dtype
from services.llm.perplexity import perplexity

# Quality configurations: (label, weight format, KV cache element type or None for the dtype's).
CONFIGS = [("none", "none", None), ("int8", "int8", None), ("fp8", "fp8", None), ("fp8_kv", "none", FP8_KV_DTYPE),
           ("fp8+fp8_kv", "fp8", FP8_KV_DTYPE)]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF directory or .gguf (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--num-paragraphs", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                        help="also time int8 decode against the dtype's weights")
    parser.add_argument("--allow-dirty", action="store_true", help="run even from uncommitted code")
    return parser.parse_args()


def paragraphs(count: int) -> list[str]:
    data = json.loads(SQUAD.read_text())["data"]
    return [p["context"] for article in data for p in article["paragraphs"]][:count]


def decode_seconds(engine: LLMEngine, prompts: list[list[int]], batch: int, max_tokens: int) -> float:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for first in range(0, len(prompts), batch):
        engine.generate(prompts[first:first + batch], params, use_tqdm=False)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if not args.allow_dirty:
        require_clean_tree()
    model = args.model or str(bundled_llm())
    device = torch.device("cpu")
    texts = paragraphs(args.num_paragraphs)
    results: dict[str, dict] = {}
    rows, quality_rows = [], []
    for dtype_name in args.dtypes:
        dtype = resolve_dtype(dtype_name, device)
        quality = {}
        for quantization in dict.fromkeys(weights for _, weights, _ in CONFIGS):
            loaded = load_model(model, device, dtype, quantization)
            for label, _, kv_dtype in (c for c in CONFIGS if c[1] == quantization):
                scores = [perplexity(loaded, loaded.tokenizer(text)["input_ids"], device, dtype, kv_dtype=kv_dtype)
                          for text in texts]
                quality[label] = sum(scores) / len(scores)
            del loaded
        changes = {label: quality[label] / quality["none"] - 1 for label in quality if label != "none"}
        results[dtype_name] = {"perplexity": quality, "perplexity_change": changes}
        quality_rows += [[dtype_name, label, f"{quality[label]:.3f}", f"{quality['none']:.3f}",
                          f"{changes[label]:+.2%}"] for label in changes]
        if not args.speed:
            continue
        engines = {q: LLMEngine(EngineConfig(model=model, device="cpu", dtype=dtype_name, quantization=q,
                                             max_num_seqs=max(args.batch_sizes))) for q in ("none", "int8")}
        prompts = [engines["none"].tokenizer(text)["input_ids"][:256] for text in texts[:8]]
        for engine in engines.values():  # the same untimed warm-up for both
            engine.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        speed = {}
        for batch in args.batch_sizes:
            for quantization, engine in engines.items():
                seconds = decode_seconds(engine, prompts, batch, args.max_tokens)
                speed[f"{quantization}_batch_{batch}_tok_s"] = len(prompts) * args.max_tokens / seconds
        results[dtype_name]["speed"] = speed
        for batch in args.batch_sizes:
            base, int8 = speed[f"none_batch_{batch}_tok_s"], speed[f"int8_batch_{batch}_tok_s"]
            rows.append([dtype_name, batch, f"{base:.1f}", f"{int8:.1f}", f"{int8 / base:.2f}x"])
        del engines
    print_table("perplexity: quantized weights / KV cache vs the dtype's own (CPU)",
                ["dtype", "weights / KV", "ppl", "ppl baseline", "change"], quality_rows)
    if rows:
        print_table("decode speed: weight-only int8 vs the dtype's weights (CPU)",
                    ["dtype", "batch", "tok/s", "tok/s int8", "speed-up"], rows)
    workload = {"model": model, "text": f"first {len(texts)} paragraphs of SQuAD dev articles 00-23, each scored alone",
                "configs": {label: {"weights": weights, "kv_cache": str(kv).removeprefix("torch.") if kv else "auto"}
                            for label, weights, kv in CONFIGS},
                "speed": args.speed, "speed_prompts": "first 8 paragraphs, truncated to 256 tokens",
                "max_tokens": args.max_tokens, "batch_sizes": args.batch_sizes,
                "note": "one process, int8 and baseline alternate per batch size"}
    # Quality alone is a different measurement from the full run: it gets its own file, not the full run's.
    path = save_result("llm_quantization" if args.speed else "llm_quantization_quality", workload=workload,
                       ours=results,
                       peer={"note": "the baseline is our own engine with the dtype's weights, in the same run"})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
