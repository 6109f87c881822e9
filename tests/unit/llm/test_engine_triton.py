"""The whole engine through the Triton kernels, without a GPU: Triton's interpreter runs them on CPU tensors.

Every schedule shape (prefill, chunked prefill, prefix-cache hit, decode, mixed prefill + decode, preemption,
n > 1) runs twice on tiny random-weight models, once on the torch references (the CPU production path) and
once with every kernel call routed to Triton; greedy tokens must be equal, in fp32 and fp16. (bf16 is left to
tests/gpu: Triton's interpreter multiplies bf16 `tl.dot` operands as their raw 16-bit patterns.) Every launch
is recorded, and the last test compiles each distinct specialization ahead of time for sm_80, sm_89 and sm_90.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from services.llm.engine import LLMEngine
from services.llm.kernels import launches
from services.llm.kernels.dispatch import triton_everywhere
from tests.unit.llm.kernels.triton_mode import requires_interpreter

from .engine_scenarios import SCENARIOS, Run

# The interpreter needs about 3 CPU-minutes for all runs; on a loaded machine the wall time is several times that.
pytestmark = [requires_interpreter, pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[3]
DTYPES = ["float32", "float16"]


@pytest.fixture(scope="module")
def runs(tiny_models: dict[str, Path], make_engine: Callable[..., LLMEngine]
         ) -> tuple[dict[tuple[str, str, str], Run], list[launches.Launch]]:
    results: dict[tuple[str, str, str], Run] = {}
    with triton_everywhere(), launches.record() as recorded:
        for (name, scenario), dtype in ((s, d) for s in SCENARIOS.items() for d in DTYPES):
            results[(name, dtype, "triton")] = scenario(make_engine, tiny_models, dtype)
    assert recorded, "no kernel launch went through Triton"
    for (name, scenario), dtype in ((s, d) for s in SCENARIOS.items() for d in DTYPES):
        results[(name, dtype, "reference")] = scenario(make_engine, tiny_models, dtype)
    return results, list(dict.fromkeys(recorded))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_triton_kernels_give_the_reference_tokens(runs, scenario: str, dtype: str) -> None:
    results, _ = runs
    triton_run, reference_run = results[(scenario, dtype, "triton")], results[(scenario, dtype, "reference")]
    assert triton_run.tokens == reference_run.tokens
    assert triton_run.stats == reference_run.stats


def test_every_kernel_ran_through_triton(runs) -> None:
    _, recorded = runs
    kernels = {launch.kernel.split(":")[1] for launch in recorded}
    assert kernels == {"_store_kv_kernel", "_rotary_kernel", "_rms_norm_kernel", "_silu_and_mul_kernel",
                       "_prefill_kernel", "_decode_split_kernel", "_decode_reduce_kernel"}


def test_recorded_specializations_compile_for_sm80_sm89_sm90(runs, tmp_path: Path) -> None:
    _, recorded = runs
    launches_file = tmp_path / "engine-launches.json"
    launches_file.write_text(json.dumps([launch.to_json() for launch in recorded]))
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "bench/kernels_compile.py", "--check", "--launches", str(launches_file),
                           "--out", str(report)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(report.read_text())["kernels"]
    assert {row["arch"] for row in rows} == {"sm_80", "sm_89", "sm_90"}
    assert all(row["error"] is None and row["shared_bytes"] <= row["shared_limit"] for row in rows)
    assert all(row["has_ptx"] and row["cubin_bytes"] > 0 for row in rows)
