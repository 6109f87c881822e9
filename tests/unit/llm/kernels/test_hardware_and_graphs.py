"""Hardware profile on the CPU, and the CUDA-graph runner's sizing and eager fallback (capture is GPU-tested)."""

from __future__ import annotations

import pytest
import torch

from services.llm.kernels.cuda_graphs import DecodeGraphRunner, default_capture_sizes
from services.llm.kernels.hardware import cpu_default_dtype, cpu_flags, detect_hardware


def test_cpu_profile_picks_bf16_only_on_cores_with_bf16_matrix_math() -> None:
    assert cpu_default_dtype({"avx2", "avx512f", "amx_bf16", "amx_tile"}) == torch.bfloat16
    assert cpu_default_dtype({"avx2", "avx512f", "avx512_bf16"}) == torch.bfloat16
    assert cpu_default_dtype({"avx2", "avx512f", "fma"}) == torch.float32
    assert cpu_default_dtype(set()) == torch.float32


def test_cpu_profile_uses_the_torch_path_in_this_machines_dtype() -> None:
    profile = detect_hardware("cpu")
    expected = cpu_default_dtype(cpu_flags())
    assert (profile.kernels, profile.dtype, profile.use_cuda_graphs) == ("torch", expected, False)
    info = profile.describe()
    assert info["bf16"] == (expected == torch.bfloat16) and info["memory_gib"] > 0
    assert info["profile"] == ("cpu-bf16-torch" if expected == torch.bfloat16 else "cpu-fp32-torch")
    assert detect_hardware("cpu", dtype=torch.float32).profile == "cpu-fp32-torch"


def test_cpu_profile_accepts_a_dtype_override() -> None:
    assert detect_hardware("cpu", dtype=torch.bfloat16).describe()["profile"] == "cpu-bf16-torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        detect_hardware("cuda")


def test_capture_sizes_cover_every_batch_up_to_the_maximum() -> None:
    assert default_capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert default_capture_sizes(3) == [1, 2, 3]
    sizes = default_capture_sizes(64)
    assert all(any(s >= b for s in sizes) for b in range(1, 65))


def test_runner_on_cpu_runs_the_step_eagerly() -> None:
    buffers = {"x": torch.zeros(8, 3)}
    runner = DecodeGraphRunner(lambda inputs: inputs["x"] * 2, buffers)
    runner.capture()
    assert not runner.enabled and runner.padded_size(3) is None
    x = torch.arange(9.0).view(3, 3)
    torch.testing.assert_close(runner.run({"x": x}), x * 2)


def test_dispatch_keeps_cpu_tensors_on_the_references(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.llm.kernels import dispatch

    assert not dispatch.use_triton(torch.zeros(1))
    dispatch.triton_available.cache_clear()
    monkeypatch.setenv("LLM_DISABLE_TRITON", "1")
    try:
        assert not dispatch.triton_available()
    finally:
        dispatch.triton_available.cache_clear()
