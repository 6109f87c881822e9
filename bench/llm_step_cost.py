"""CPU cost of the engine's steps: per decode step and per output token at a few batch sizes, and per prefill.

Wall time on a shared machine says little; CPU time spent by this process (all its threads, from
`getrusage`) is steadier. For each batch size B the engine prefills B prompts (random ordinary token ids,
`--prompt-len` tokens each, EOS ignored), then times `--steps` decode steps one by one: the table gives the
median step's CPU-ms and wall-ms, and CPU-ms per output token. The prefill row is the CPU-ms of prefilling
B prompts (all of the steps until every sequence has its first token). Nothing is written to bench/results:
this is a tool for before/after comparisons of one change, run in the same conditions, e.g.

    python bench/llm_step_cost.py                          # bundled SmolLM2 GGUF, profile dtype, B = 1 8 32
    python bench/llm_step_cost.py --batch-sizes 8 --steps 64 --repeat 3
    python bench/llm_step_cost.py --set cpu_weight_packing=False     # an EngineConfig field changed
"""

from __future__ import annotations

import argparse
import ast
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.model_files import bundled_llm
from services.llm.engine import EngineConfig, LLMEngine, SamplingParams


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF directory or .gguf (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=200)
    parser.add_argument("--steps", type=int, default=32, help="decode steps timed per batch size")
    parser.add_argument("--repeat", type=int, default=1, help="times each batch size is measured (median of all)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="an EngineConfig field for this run (a Python literal), e.g. cpu_weight_packing=False")
    return parser.parse_args()


def measure(engine: LLMEngine, batch: int, prompt_len: int, steps: int, rng: random.Random,
            ordinary: list[int]) -> tuple[float, list[float], list[float]]:
    """(prefill CPU-s, per-step CPU-s, per-step wall-s) for one batch of `batch` fresh requests."""
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    tag = rng.random()
    for i in range(batch):
        engine.add_request(f"cost-{tag}-{i}", [rng.choice(ordinary) for _ in range(prompt_len)], params)
    started = cpu_seconds()
    prefilled: set[str] = set()
    while len(prefilled) < batch:
        prefilled.update(output.request_id for output in engine.step())
    prefill = cpu_seconds() - started
    cpu, wall = [], []
    for _ in range(steps):
        c0, w0 = cpu_seconds(), time.perf_counter()
        engine.step()
        cpu.append(cpu_seconds() - c0)
        wall.append(time.perf_counter() - w0)
    while engine.has_unfinished():
        engine.step()
    return prefill, cpu, wall


def main() -> None:
    args = parse_args()
    fields = {}
    for item in args.set:
        name, _, value = item.partition("=")
        fields[name] = ast.literal_eval(value)
    engine = LLMEngine(EngineConfig(model=args.model or str(bundled_llm()), device="cpu", dtype=args.dtype,
                                    **fields))
    special = set(engine.tokenizer.all_special_ids) | engine.eos_token_ids
    ordinary = [t for t in range(engine.model_config.vocab_size) if t not in special]
    rng = random.Random(0)
    measure(engine, 2, 16, 4, rng, ordinary)  # warm-up
    print(f"{engine.model_name} {engine.dtype}, prompts of {args.prompt_len} tokens, {args.steps} decode steps"
          + (f", {fields}" if fields else ""))
    print(f"{'batch':>5} {'prefill CPU-ms':>15} {'step CPU-ms':>12} {'step wall-ms':>13} {'CPU-ms/token':>13}")
    for batch in args.batch_sizes:
        prefills, cpu, wall = [], [], []
        for _ in range(args.repeat):
            prefill, step_cpu, step_wall = measure(engine, batch, args.prompt_len, args.steps, rng, ordinary)
            prefills.append(prefill)
            cpu += step_cpu
            wall += step_wall
        step = statistics.median(cpu)
        print(f"{batch:>5} {1e3 * statistics.median(prefills):>15.1f} {1e3 * step:>12.2f} "
              f"{1e3 * statistics.median(wall):>13.2f} {1e3 * step / batch:>13.3f}", flush=True)


if __name__ == "__main__":
    main()
