"""fp8 e4m3 kernels: weight-only fp8 GEMM and the fp8 KV cache (store, then attention that widens it), the Triton
kernels under Triton's interpreter against the torch references, and the CPU attention path against the oracle.
(Triton's interpreter mishandles bf16 `tl.dot` operands, so activations here are fp32 and fp16; tests/gpu
covers bf16.)"""

from __future__ import annotations

import pytest
import torch

from services.llm.kernels.attention import paged_attention_reference, paged_decode_attention_reference
from services.llm.kernels.attention_cpu import cpu_paged_attention, plan_cpu_attention
from services.llm.kernels.fp8_matmul import fp8_matmul, fp8_matmul_reference, quantize_fp8_per_channel
from services.llm.kernels.kv_store import FP8_KV_DTYPE, store_kv_reference, to_cache_dtype
from tests.unit.llm.kernels.paged_cache import build_paged_cache, oracle_attention
from tests.unit.llm.kernels.triton_mode import requires_interpreter

BLOCK = 16
E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(FP8_KV_DTYPE).float()


def e4m3_values() -> torch.Tensor:
    """Inputs where a cast to e4m3 can go wrong: every midpoint between neighbours (ties round to even), values
    just past them, past the largest finite value (saturation), subnormals, and signed zeros."""
    grid = E4M3_GRID[torch.isfinite(E4M3_GRID)].unique()
    mids = (grid[1:] + grid[:-1]) / 2
    return torch.cat([mids, mids * (1 + 2**-10), torch.tensor([449.0, -460.0, 464.0, 1e4, -0.0, 0.0, 2**-10])])


def test_fp8_weights_hold_each_channel_within_e4m3_precision() -> None:
    weight = torch.randn(48, 80, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 48)[:, None]
    w8, scale = quantize_fp8_per_channel(weight)
    assert w8.dtype == torch.float8_e4m3fn and scale.shape == (48,)
    assert torch.equal(w8.float().abs().amax(dim=1), torch.full((48,), 448.0))  # each row's largest maps to 448
    restored = w8.float() * scale[:, None]
    # e4m3 keeps 3 mantissa bits: at most half an ulp, 2**-4 of the value, off (subnormals: 2**-10 of the row max).
    bound = torch.maximum(weight.abs() * 2**-4, scale[:, None] * 2**-10)
    assert ((restored - weight).abs() <= bound * 1.0001).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_matmul_on_cpu_is_the_gemm_on_widened_weights(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    w8, scale = quantize_fp8_per_channel(torch.randn(96, 64, generator=generator))
    x = torch.randn(2, 7, 64, generator=generator).to(dtype)
    got = fp8_matmul(x, w8, scale.to(dtype))
    want = x.double() @ (w8.double() * scale.double()[:, None]).T
    assert got.shape == (2, 7, 96) and got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tolerance * want.abs().max().item(), rtol=tolerance)


def test_fp8_cache_write_saturates_and_rounds_to_nearest_even() -> None:
    values = e4m3_values()
    stored = to_cache_dtype(values, FP8_KV_DTYPE).float()
    assert torch.isfinite(stored).all() and stored.abs().max() == 448.0
    # Round to nearest (ties to even) on the grid: no grid value is closer than the one chosen.
    grid = E4M3_GRID[torch.isfinite(E4M3_GRID)]
    clamped = values.clamp(-448, 448)
    nearest = (grid[None, :] - clamped[:, None]).abs().min(dim=1).values
    assert torch.equal((stored - clamped).abs(), nearest)


def test_cpu_attention_over_an_fp8_cache_matches_the_oracle() -> None:
    # Whole prompts (read in place, as the cache holds them), an extension, decodes: all over e4m3 keys/values.
    q_lens, seq_lens, num_heads, num_kv_heads, head_dim = [9, 3, 1, 1], [9, 20, 17, 30], 6, 2, 32
    k_cache, v_cache, tables = build_paged_cache(seq_lens, num_kv_heads, head_dim, BLOCK, dtype=FP8_KV_DTYPE)
    slots = torch.tensor([int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK for b, (n, s) in
                          enumerate(zip(q_lens, seq_lens, strict=True)) for p in range(s - n, s)])
    generator = torch.Generator().manual_seed(5)
    k_new = torch.randn(len(slots), num_kv_heads, head_dim, generator=generator) * 3  # not e4m3 values
    v_new = torch.randn(len(slots), num_kv_heads, head_dim, generator=generator)
    q = torch.randn(len(slots), num_heads, head_dim, generator=generator)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    store_kv_reference(k_new, v_new, k_want, v_want, slots)
    cu = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    want = oracle_attention(q, k_want.float(), v_want.float(), tables, cu, seq_lens, 0.2)
    plan = plan_cpu_attention(q_lens, seq_lens, tables, slots, BLOCK, 2 * num_kv_heads * head_dim)
    got = cpu_paged_attention(q, k_new, v_new, k_cache, v_cache, plan, 0.2)
    assert torch.equal(k_cache.view(torch.uint8), k_want.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), v_want.view(torch.uint8))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


# ---- the Triton kernels, run by the interpreter --------------------------------------------------------------

@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("rows", "tiles"), [(1, {}), (5, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}),
                                             (70, {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32})])
def test_fp8_matmul_kernel_matches_its_reference(dtype: torch.dtype, rows: int, tiles: dict[str, int]) -> None:
    from services.llm.kernels.fp8_matmul_triton import fp8_matmul_triton

    # Ragged shapes: no dimension is a multiple of the tiles, so every mask is exercised.
    generator = torch.Generator().manual_seed(rows)
    w8, scale = quantize_fp8_per_channel(torch.randn(90, 200, generator=generator))
    x = torch.randn(rows, 200, generator=generator).to(dtype)
    got = fp8_matmul_triton(x, w8, scale.to(dtype), **tiles)
    want = fp8_matmul_reference(x.float(), w8, scale.to(dtype).float())
    assert got.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want, atol=tolerance * want.abs().max().item(), rtol=tolerance)


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_cache_store_kernel_writes_the_reference_bytes(dtype: torch.dtype) -> None:
    from services.llm.kernels.kv_store_triton import store_kv_triton

    generator = torch.Generator().manual_seed(2)
    values = e4m3_values().to(dtype).float()
    keys = torch.randn(40, 2, 64, generator=generator) * torch.logspace(-4, 3, 40)[:, None, None]
    vals = torch.randn(40, 2, 64, generator=generator)
    vals.view(-1)[:values.numel()] = values
    slots = torch.randperm(64, generator=generator)[:40]
    slots[3] = -1  # padding
    got = [torch.zeros(4, BLOCK, 2, 64, dtype=FP8_KV_DTYPE) for _ in range(2)]
    want = [cache.clone() for cache in got]
    store_kv_triton(keys.to(dtype), vals.to(dtype), *got, slots)
    store_kv_reference(keys.to(dtype), vals.to(dtype), *want, slots)
    for ours, reference in zip(got, want, strict=True):
        assert torch.equal(ours.view(torch.uint8), reference.view(torch.uint8))


@requires_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_kernels_read_an_fp8_cache_like_the_reference(dtype: torch.dtype) -> None:
    from services.llm.kernels.attention_triton import paged_attention_triton, paged_decode_attention_triton

    seq_lens = [1, 15, 17, 45]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 2, 64, BLOCK, dtype=FP8_KV_DTYPE, seed=4)
    generator = torch.Generator().manual_seed(4)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(len(seq_lens), 6, 64, generator=generator).to(dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    for splits in (1, 3):
        got = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.1, num_splits=splits, block_n=16)
        want = paged_decode_attention_reference(q.float(), k_cache, v_cache, tables, lens, 0.1)
        torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)
    q_lens = [1, 5, 17, 0]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), 6, 64, generator=generator).to(dtype)
    got = paged_attention_triton(q, k_cache, v_cache, tables, cu, lens, 0.1, block_m=16, block_n=16)
    want = paged_attention_reference(q.float(), k_cache, v_cache, tables, cu, lens, 0.1)
    torch.testing.assert_close(got.float(), want, atol=tolerance, rtol=tolerance)
