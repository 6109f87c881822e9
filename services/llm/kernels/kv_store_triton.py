"""Triton kernel writing new keys and values into the paged cache, quantizing them for an fp8 cache (see
`kv_store.py`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.llm.kernels.launches import launch


@triton.jit
def _round_to_e4m3(x):
    """`x` saturated at ±448 and rounded to nearest-even on e4m3's grid, in fp32, so the cast that follows is
    exact and the result is the torch reference's whatever rounding the backend's cast does (Triton 3.7's
    interpreter drops the carry of a rounded-up mantissa)."""
    x = x.to(tl.float32)
    a = tl.abs(x)
    bits = a.to(tl.uint32, bitcast=True)
    # Normal numbers keep 3 of fp32's 23 mantissa bits: add half an ulp (ties to even), then cut.
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    # Below 2**-6 e4m3 is subnormal, a fixed step of 2**-9: adding 2**14 leaves fp32 exactly that step.
    subnormal = (a + 16384.0) - 16384.0
    rounded = tl.minimum(tl.where(a < 0.015625, subnormal, normal), 448.0)
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000  # by bits, so -0.0 stays -0.0 as in torch
    return (rounded.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cs, stride_ch, stride_vcs, stride_vch,
    num_kv_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    # Negative slots are padding: no head is in range, so the whole row is masked off.
    heads_in_range = tl.where(slot >= 0, num_kv_heads, 0)
    mask = (heads[:, None] < heads_in_range) & (dims[None, :] < head_dim)
    key = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    if k_cache_ptr.dtype.element_ty == tl.float8e4nv:
        key = _round_to_e4m3(key)
        value = _round_to_e4m3(value)
    tl.store(k_cache_ptr + slot * stride_cs + heads[:, None] * stride_ch + dims[None, :],
             key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + slot * stride_vcs + heads[:, None] * stride_vch + dims[None, :],
             value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    assert k_cache.dtype == v_cache.dtype
    for cache in (k_cache, v_cache):
        assert cache.stride(0) == cache.shape[1] * cache.stride(1), "a slot must be one index into the cache"
    launch(
        _store_kv_kernel, (num_tokens,),
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
