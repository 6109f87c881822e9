"""`bench/gpu_check.sh` without a GPU: a dry run that skips the GPU steps, says so, and proves the rest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs for real")]

ROOT = Path(__file__).resolve().parents[3]


def test_dry_run_skips_the_gpu_steps_and_smoke_tests_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-check"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "900"}
    done = subprocess.run(["bash", "bench/gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stderr[-2000:]
    assert "no CUDA GPU: dry run" in summary
    assert "SKIP tests/gpu: no CUDA GPU" in summary and "PASS tests/gpu collected" in summary
    assert "SKIP bench/kernels.py: no CUDA GPU" in summary
    assert "PASS dependencies: all present" in summary
    assert "PASS bench/gpu_smoke.py --tiny (CPU)" in summary and "FAIL" not in summary
    collected = (out / "tests-gpu.txt").read_text()
    assert "test_engine_triton_gpu.py" in collected and "test_kernels_gpu.py" in collected
    smoke = json.loads((out / "smoke.json").read_text())
    assert smoke["device"] == "cpu" and all(step["ok"] for step in smoke["steps"].values())
    assert smoke["steps"]["server"]["chat"]["usage"]["completion_tokens"] >= 1
    assert "cuda available False" in (out / "env.txt").read_text()
