"""What grammar-constrained decoding costs: engine throughput with and without a JSON-schema constraint.

The same prompts and the same number of output tokens on both sides: the free side ignores EOS; the constrained
side follows a schema (an array of at least 200 records) that cannot end within the token budget, so both produce
exactly `--output-len` tokens per request and the only difference is the grammar (masks filled on the worker
thread while the model runs, then applied in the sampler). Greedy on both sides. Concurrency 1 runs the requests
one after another; concurrency 16 runs 16 at once in the engine's batches. Start-up is excluded on both sides and
both get the same untimed warm-up (the constrained one compiles the grammar there; its compile time is reported
apart). Rounds alternate free / constrained and the median round counts.
Writes bench/results/structured_overhead-*.json.

    python bench/structured_overhead.py                   # bundled SmolLM2-135M, concurrency 1 and 16
    python bench/structured_overhead.py --rounds 5 --output-len 64
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import print_table, require_clean_tree, save_result
from common.model_files import bundled_llm
from services.llm.engine import EngineConfig, LLMEngine, SamplingParams
from services.llm.guided import GuidedDecoding

SCHEMA = {"type": "array", "minItems": 200, "items": {
    "type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "tags": {"type": "array", "items": {"type": "string"}}}}}
PROMPT = "List the people in the registry as JSON records with name, age and tags."


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF directory or .gguf (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests-per-level", type=int, default=16,
                        help="requests per measurement at each concurrency")
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3, help="alternating free/constrained rounds; median counts")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--allow-dirty", action="store_true", help="run even from uncommitted code")
    return parser.parse_args()


def prompts(engine: LLMEngine, count: int) -> list[list[int]]:
    """The same chat prompt with a different record count per request (distinct prompts, same length range)."""
    rng = random.Random(0)
    texts = [f"{PROMPT} There are {rng.randint(200, 999)} of them." for _ in range(count)]
    return [engine.tokenizer.encode(engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True), add_special_tokens=False)
        for t in texts]


def run(engine: LLMEngine, batch: list[list[int]], concurrency: int, params: SamplingParams) -> tuple[float, int]:
    """Seconds and output tokens for `batch`, `concurrency` requests at a time."""
    tokens = 0
    start = time.perf_counter()
    for first in range(0, len(batch), concurrency):
        for output in engine.generate(batch[first:first + concurrency], params, use_tqdm=False):
            tokens += sum(len(c.token_ids) for c in output.outputs)
    return time.perf_counter() - start, tokens


def main() -> None:
    args = parse_args()
    if not args.allow_dirty:
        require_clean_tree()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or str(bundled_llm())
    engine = LLMEngine(EngineConfig(model=model, device="cpu", dtype=args.dtype, enable_prefix_caching=False))
    free = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    guided = GuidedDecoding.json_schema(SCHEMA)
    constrained = SamplingParams(max_tokens=args.output_len, temperature=0.0, guided=guided)
    batch = prompts(engine, args.requests_per_level)

    warm = batch[0][:16]
    engine.generate([warm], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    started = time.perf_counter()
    engine.guided.compiler.compile(guided)  # the first call also reads the vocabulary into xgrammar
    compile_seconds = time.perf_counter() - started
    engine.generate([warm], SamplingParams(max_tokens=4, temperature=0.0, guided=guided), use_tqdm=False)

    levels: dict[str, dict] = {}
    rows = []
    for concurrency in args.concurrency:
        rates: dict[str, list[float]] = {"free": [], "constrained": []}
        counts: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, params in (("free", free), ("constrained", constrained)):
                seconds, tokens = run(engine, batch, concurrency, params)
                rates[name].append(tokens / seconds)
                counts[name] = tokens
        assert counts["free"] == counts["constrained"] == len(batch) * args.output_len, counts
        free_rate, constrained_rate = statistics.median(rates["free"]), statistics.median(rates["constrained"])
        overhead = 1 - constrained_rate / free_rate
        levels[str(concurrency)] = {"free_output_tok_s": free_rate, "constrained_output_tok_s": constrained_rate,
                                    "overhead": overhead, "rounds": rates, "output_tokens_each_side": counts["free"]}
        rows.append([concurrency, free_rate, constrained_rate, f"{overhead:.1%}"])
    print_table("output tokens/s (median round)", ["concurrency", "free", "constrained", "overhead"], rows)
    print(f"grammar compile (first, includes reading the vocabulary): {compile_seconds:.2f} s")
    workload = {"model": Path(model).name, "dtype": str(engine.dtype).removeprefix("torch."),
                "requests_per_level": len(batch), "output_len": args.output_len, "rounds": args.rounds,
                "schema": SCHEMA, "greedy": True, "torch_threads": torch.get_num_threads()}
    path = save_result("structured_overhead", workload=workload,
                       ours={"levels": levels, "first_compile_seconds": compile_seconds},
                       peer={"note": "the same engine without a constraint is the baseline (in each level)"})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
