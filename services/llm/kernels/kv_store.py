"""Write new keys and values into the paged cache at their slots (Triton kernel in `kv_store_triton.py`)."""

from __future__ import annotations

import torch

from services.llm.kernels.dispatch import use_triton


def store_kv_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """key/value `[T, Hkv, D]`; slot_mapping `[T]` int64; negative slots are padding and skipped."""
    num_blocks, block_size = k_cache.shape[:2]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(num_blocks * block_size, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(num_blocks * block_size, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    if use_triton(key):
        from services.llm.kernels import kv_store_triton

        kv_store_triton.store_kv_triton(key, value, k_cache, v_cache, slot_mapping)
        return
    store_kv_reference(key, value, k_cache, v_cache, slot_mapping)
