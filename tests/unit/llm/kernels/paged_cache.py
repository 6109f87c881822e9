"""Builders for paged-cache test inputs and the obviously-correct attention oracle the kernels are checked against."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def build_paged_cache(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                      dtype: torch.dtype = torch.float32, seed: int = 0,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random k/v caches and block tables whose blocks are shuffled, so a kernel that ignores the table fails."""
    gen = torch.Generator().manual_seed(seed)
    needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(needed) + 2  # spare blocks hold garbage nobody may read
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(needed) + 1
    tables = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(needed):
        tables[b, :n] = torch.tensor(order[used:used + n], dtype=torch.int32)
        used += n
    return k_cache, v_cache, tables


def oracle_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     cu_seqlens_q: list[int], seq_lens: list[int], scale: float) -> torch.Tensor:
    """Token by token, head by head, in float64: what paged causal attention means."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    block_size = k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, seq_len in enumerate(seq_lens):
        q_start, q_end = cu_seqlens_q[b], cu_seqlens_q[b + 1]
        q_len = q_end - q_start
        slots = [(int(block_tables[b, t // block_size]), t % block_size) for t in range(seq_len)]
        keys = torch.stack([k_cache[blk, off] for blk, off in slots]).double()  # [L, Hkv, D]
        values = torch.stack([v_cache[blk, off] for blk, off in slots]).double()
        for j in range(q_len):
            position = seq_len - q_len + j
            for h in range(num_heads):
                kv_head = h // (num_heads // num_kv_heads)
                scores = keys[: position + 1, kv_head] @ q[q_start + j, h].double() * scale
                weights = torch.softmax(scores, dim=0)
                out[q_start + j, h] = weights @ values[: position + 1, kv_head]
    return out


def outputs_at_thread_counts(run: Callable[[], torch.Tensor], counts: tuple[int, ...] = (1, 2, 5),
                             ) -> list[torch.Tensor]:
    """`run()`'s output with torch (and so the kernels' OpenMP) at each thread count, the count restored after."""
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in counts:
            torch.set_num_threads(threads)
            outputs.append(run())
        return outputs
    finally:
        torch.set_num_threads(before)
