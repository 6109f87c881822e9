"""Weight-only int8 against the dtype's own weights: perplexity on SQuAD paragraphs and decode speed on CPU.

For each dtype (fp32, bf16) the bundled model (or `--model`) is loaded with `quantization=none` and `int8`.
Quality: perplexity over the first `--num-paragraphs` paragraphs of the shared SQuAD dev articles, each scored
on its own (one prefill, every next token). Speed: the same prompts (the first paragraphs, as plain text),
`--max-tokens` new tokens each with EOS ignored, at batch 1 and batch 8, one untimed warm-up per engine, model
load outside the timed region; int8 and its baseline alternate per batch size in one process.
Writes bench/results/llm_quantization-*.json. Needs ../shared/eval/squad.

    python bench/llm_quantization.py
    python bench/llm_quantization.py --dtypes bfloat16 --num-paragraphs 16
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
from services.llm.loader import load_model, resolve_dtype
from services.llm.perplexity import perplexity


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF directory or .gguf (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--num-paragraphs", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
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
    rows = []
    for dtype_name in args.dtypes:
        dtype = resolve_dtype(dtype_name, device)
        quality = {}
        for quantization in ("none", "int8"):
            loaded = load_model(model, device, dtype, quantization)
            scores = [perplexity(loaded, loaded.tokenizer(text)["input_ids"], device, dtype) for text in texts]
            quality[quantization] = sum(scores) / len(scores)
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
        change = quality["int8"] / quality["none"] - 1
        results[dtype_name] = {"perplexity": quality, "perplexity_change": change, "speed": speed}
        for batch in args.batch_sizes:
            base, int8 = speed[f"none_batch_{batch}_tok_s"], speed[f"int8_batch_{batch}_tok_s"]
            rows.append([dtype_name, batch, f"{quality['none']:.3f}", f"{quality['int8']:.3f}", f"{change:+.2%}",
                         f"{base:.1f}", f"{int8:.1f}", f"{int8 / base:.2f}x"])
        del engines
    print_table("weight-only int8 vs the dtype's weights (CPU)",
                ["dtype", "batch", "ppl", "ppl int8", "change", "tok/s", "tok/s int8", "speed-up"], rows)
    workload = {"model": model, "text": f"first {len(texts)} paragraphs of SQuAD dev articles 00-23, each scored alone",
                "speed_prompts": "first 8 paragraphs, truncated to 256 tokens", "max_tokens": args.max_tokens,
                "batch_sizes": args.batch_sizes, "note": "one process, int8 and baseline alternate per batch size"}
    path = save_result("llm_quantization", workload=workload, ours=results,
                       peer={"note": "the baseline is our own engine with the dtype's weights, in the same run"})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
