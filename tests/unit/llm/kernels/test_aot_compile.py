"""Every kernel specialization a production model launches compiles for sm_80, sm_89 and sm_90, without a GPU;
fp8 ones (e4m3 weights and KV cache) for sm_89 and sm_90, the architectures that have e4m3.

`bench/kernels_compile.py --production` records the launches of Qwen2.5-7B-Instruct and Llama-3-8B shapes (with
bf16, int8, GGUF Q8_0/Q4_0/Q4_1/Q4_K/Q6_K and fp8 projections, the last with an fp8 KV cache) on the meta device and
compiles each distinct specialization with `triton.compile` for real GPU targets (PTX, then a cubin from the
ptxas in the triton wheel). The engine's own launches, recorded under the interpreter, are compiled by
`tests/unit/llm/test_engine_triton.py`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[4]
KERNELS = {"decode_split_kernel", "decode_reduce_kernel", "prefill_kernel", "store_kv_kernel", "rms_norm_kernel",
           "rotary_kernel", "silu_and_mul_kernel", "int8_matmul_kernel", "gguf_matmul_kernel", "fp8_matmul_kernel"}
WEIGHTS = ("bf16", "int8", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "fp8")
FP8_ONLY = {"fp8_matmul_kernel"}  # launched only with fp8 weights, so compiled for sm_89 and sm_90 alone


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("aot") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "bench/kernels_compile.py", "--check", "--production", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_every_architecture(report: dict) -> None:
    rows = report["kernels"]
    assert {(row["kernel"], row["arch"]) for row in rows} == {(k, a) for k in KERNELS
                                                              for a in ("sm_80", "sm_89", "sm_90")
                                                              if not (k in FP8_ONLY and a == "sm_80")}
    assert [row for row in rows if row["error"]] == []
    assert all(row["has_ptx"] and row["cubin_bytes"] > 0 for row in rows)
    sources = {source for row in rows for source in row["sources"]}
    assert sources == {f"{model} {weights} block 16" for model in ("Qwen2.5-7B-Instruct", "Llama-3-8B")
                       for weights in WEIGHTS}
    gguf = {row["constants"]["FORMAT"] for row in rows if row["kernel"] == "gguf_matmul_kernel"}
    assert gguf == {0, 1, 2}


def test_fp8_launches_compile_for_sm89_and_sm90_and_skip_sm80(report: dict) -> None:
    # The cache kernels on an e4m3 pool and the fp8 GEMM: compiled where e4m3 exists, left out (and said so) on sm_80.
    fp8_rows = [row for row in report["kernels"]
                if any(kind.lstrip("*") == "fp8e4nv" for kind in row["signature"].values())]  # pointers: "*fp8e4nv"
    assert {(row["kernel"], row["arch"]) for row in fp8_rows} == {
        (k, a) for k in ("store_kv_kernel", "decode_split_kernel", "prefill_kernel", "fp8_matmul_kernel")
        for a in ("sm_89", "sm_90")}
    skipped = report["ours"]["skipped_fp8_below_sm89"]
    assert skipped and all(name.endswith(" sm_80") for name in skipped)


def test_shared_memory_within_each_architecture_limit(report: dict) -> None:
    limits = {"sm_80": 163 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
    over = [(row["kernel"], row["arch"], row["shared_bytes"]) for row in report["kernels"]
            if row["shared_bytes"] > limits[row["arch"]]]
    assert over == []


def test_hot_kernels_do_not_spill(report: dict) -> None:
    hot = [row for row in report["kernels"] if row["kernel"] in ("decode_split_kernel", "prefill_kernel",
                                                                 "int8_matmul_kernel", "gguf_matmul_kernel",
                                                                 "fp8_matmul_kernel")]
    assert hot and all(row["spill_stores"] == 0 and row["spill_loads"] == 0 for row in hot)
    assert all(row["occupancy"] > 0 for row in report["kernels"])
