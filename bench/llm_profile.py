"""Where the engine's time goes: py-spy flame graphs of a decode-heavy and a prefill-heavy offline load.

Each load runs our engine in a child process; once the model is loaded and warmed up, `py-spy record`
(installed on first use into its own venv under .bench/) attaches to it until the load ends, so start-up is
not in the picture. The SVG flame graph goes to bench/results/flamegraphs/<load>-<dtype>.svg; the child
prints the load's throughput. Loads (32 requests each unless `--num-requests`, random token ids, EOS ignored):
- `decode`: prompts of 16-64 tokens, 256 tokens out: the steady decode of a full batch;
- `prefill`: prompts of 400-800 tokens, 4 tokens out: chunked prefill at the token budget.

    python bench/llm_profile.py                    # both loads, the hardware profile's dtype
    python bench/llm_profile.py --load decode --dtype float32 --rate 50
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.llm_servers import ensure_venv  # noqa: E402

PY_SPY_VERSION = "0.4.3"
LOADS = {"decode": {"prompt_len": (16, 64), "output_len": 256},
         "prefill": {"prompt_len": (400, 800), "output_len": 4}}
NUM_REQUESTS = 32
READY = "ready to profile"
ATTACH_SECONDS = 3.0


def run_load(load: str, dtype: str, model: str, num_requests: int) -> None:
    """The child: one warm-up request, then the load; prints its throughput."""
    from services.llm.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=model, dtype=dtype))
    rng = random.Random(0)
    shape = LOADS[load]
    special = set(engine.tokenizer.all_special_ids) | engine.eos_token_ids
    ordinary = [t for t in range(engine.model_config.vocab_size) if t not in special]
    prompts = [[rng.choice(ordinary) for _ in range(rng.randint(*shape["prompt_len"]))] for _ in range(num_requests)]
    params = SamplingParams(max_tokens=shape["output_len"], temperature=0.0, ignore_eos=True)
    engine.generate([prompts[0][:16]], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    print(READY, flush=True)
    time.sleep(ATTACH_SECONDS)  # py-spy attaches now
    start = time.perf_counter()
    engine.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    output = num_requests * shape["output_len"]
    prompt = sum(map(len, prompts))
    print(f"{load} ({engine.hardware.profile}, {engine.dtype}): {seconds:.1f}s, {output / seconds:.1f} output tok/s, "
          f"{(prompt + output) / seconds:.1f} total tok/s")


def profile(load: str, dtype: str, model: str, rate: int, out_dir: Path, num_requests: int) -> Path:
    py_spy = ensure_venv("py-spy", [f"py-spy=={PY_SPY_VERSION}"]) / "bin" / "py-spy"
    out_dir.mkdir(parents=True, exist_ok=True)
    svg = out_dir / f"{load}-{dtype}.svg"
    child = [sys.executable, str(Path(__file__).resolve()), "--child", load, "--dtype", dtype,
             "--num-requests", str(num_requests)]
    if model:
        child += ["--model", model]
    process = subprocess.Popen(child, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    for line in process.stdout:
        print(line, end="")
        if line.strip() == READY:
            break
    recorder = subprocess.Popen([str(py_spy), "record", "--rate", str(rate), "--format", "flamegraph",
                                 "--output", str(svg), "--pid", str(process.pid)])
    for line in process.stdout:
        print(line, end="")
    if process.wait() != 0 or recorder.wait() != 0:
        raise SystemExit(f"profiling {load} failed")
    return svg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", choices=[*LOADS, "both"], default="both")
    parser.add_argument("--dtype", default="auto", help="engine dtype (auto: the hardware profile's)")
    parser.add_argument("--model", default="", help="model directory or .gguf (default: the bundled SmolLM2)")
    parser.add_argument("--num-requests", type=int, default=NUM_REQUESTS, help="requests in each load")
    parser.add_argument("--rate", type=int, default=25, help="py-spy samples per second (fewer: a smaller SVG)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "flamegraphs")
    parser.add_argument("--child", choices=list(LOADS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        from common.model_files import bundled_llm

        run_load(args.child, args.dtype, args.model or str(bundled_llm()), args.num_requests)
        return
    for load in LOADS if args.load == "both" else [args.load]:
        print(f"wrote {profile(load, args.dtype, args.model, args.rate, args.out_dir, args.num_requests)}")


if __name__ == "__main__":
    main()
