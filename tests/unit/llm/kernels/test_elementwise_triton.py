"""KV store, RMSNorm, rotary and SiLU-and-mul: Triton kernels (interpreted on the CPU) against the references."""

from __future__ import annotations

import pytest
import torch

from services.llm.kernels.activation import silu_and_mul_reference
from services.llm.kernels.activation_triton import silu_and_mul_triton
from services.llm.kernels.kv_store import store_kv_reference
from services.llm.kernels.kv_store_triton import store_kv_triton
from services.llm.kernels.norm import fused_add_rms_norm_reference, rms_norm_reference
from services.llm.kernels.norm_triton import fused_add_rms_norm_triton, rms_norm_triton
from services.llm.kernels.rotary import apply_rotary_reference, build_cos_sin_cache
from services.llm.kernels.rotary_triton import apply_rotary_triton
from tests.unit.llm.kernels.triton_mode import requires_interpreter

pytestmark = requires_interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_kernel_writes_the_same_slots(dtype: torch.dtype) -> None:
    num_blocks, block_size, heads, dim = 4, 8, 3, 64
    # A fused qkv buffer: key and value are strided views, as the attention layer hands them over.
    qkv = torch.randn(6, 9, dim).to(dtype)
    key, value = qkv[:, 3:6], qkv[:, 6:9]
    slots = torch.tensor([0, 7, 8, -1, 31, 12], dtype=torch.int64)
    caches = [torch.zeros(num_blocks, block_size, heads, dim, dtype=dtype) for _ in range(4)]
    store_kv_triton(key, value, caches[0], caches[1], slots)
    store_kv_reference(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0].view(-1, heads, dim)[7].abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_kernels_match_reference(dtype: torch.dtype, hidden: int) -> None:
    x = torch.randn(5, hidden).to(dtype)
    residual = torch.randn(5, hidden).to(dtype)
    weight = (torch.rand(hidden) + 0.5).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(rms_norm_triton(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6), **tol)
    normed, summed = fused_add_rms_norm_triton(x, residual, weight, 1e-6)
    want_normed, want_summed = fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    torch.testing.assert_close(summed, want_summed, **tol)
    torch.testing.assert_close(normed, want_normed, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(6, 2, 64), (4, 1, 128)])
def test_rotary_kernel_matches_reference(dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                                         head_dim: int) -> None:
    cache = build_cos_sin_cache(head_dim, 64, 10000.0, {"rope_type": "llama3", "factor": 8.0,
                                                        "original_max_position_embeddings": 16})
    qkv = torch.randn(5, num_heads + 2 * num_kv_heads, head_dim).to(dtype)
    positions = torch.tensor([0, 3, 17, 40, 63])
    q, k = qkv[:, :num_heads].clone(), qkv[:, num_heads:num_heads + num_kv_heads].clone()
    # The kernel works in place on strided views of the fused buffer.
    apply_rotary_triton(qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads], positions, cache)
    apply_rotary_reference(q, k, positions, cache)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(qkv[:, :num_heads], q, **tol)
    torch.testing.assert_close(qkv[:, num_heads:num_heads + num_kv_heads], k, **tol)
    assert not torch.equal(qkv[1:, :num_heads].float(), q[1:].float() * 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [48, 200])
def test_silu_and_mul_kernel_matches_reference(dtype: torch.dtype, intermediate: int) -> None:
    x = torch.randn(3, 2 * intermediate).to(dtype)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(silu_and_mul_triton(x, block=64), silu_and_mul_reference(x), **tol)
