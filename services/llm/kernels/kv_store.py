"""Write new keys and values into the paged cache at their slots (Triton kernel in `kv_store_triton.py`).

The cache is either in the model's dtype or in fp8 e4m3 (`LLM_KV_CACHE_DTYPE=fp8`, one byte per element). An fp8
cache holds each layer's keys and values divided by that layer's scale (`fp8_kv_scale`): a power of two, so the
division and the multiplication that undoes it are exact, chosen from an upper bound on what the layer can
write (`LlamaDecoderLayer.kv_bounds`, from its weights alone). The bound maps to at most 448, e4m3's largest
value, so nothing saturates, and small values stay in e4m3's normal range instead of its coarse subnormals (with
a scale of 1.0, SmolLM2's first-layer values are 42% subnormal). Writes still saturate at ±448 rather than turn
a value past the bound (a LoRA adapter's) into NaN.
"""

from __future__ import annotations

import math

import torch

from services.llm.kernels.dispatch import use_triton

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448


def fp8_kv_scale(bound: float) -> float:
    """The smallest power of two that brings `bound` (the largest magnitude a layer writes) to 448 or less."""
    return 2.0 ** math.ceil(math.log2(max(bound, 2.0**-100) / FP8_MAX))


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` as the cache stores it: a plain cast, saturating at fp8's largest finite value."""
    if dtype == FP8_KV_DTYPE:
        return x.clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


def store_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """key/value `[T, Hkv, D]`; slot_mapping `[T]` int64; negative slots are padding and skipped."""
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slots] = to_cache_dtype(key[keep], k_cache.dtype)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slots] = to_cache_dtype(value[keep], v_cache.dtype)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    if use_triton(key):
        from services.llm.kernels import kv_store_triton

        kv_store_triton.store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
        return
    store_kv_reference(key, value, k_cache, v_cache, slot_mapping)
