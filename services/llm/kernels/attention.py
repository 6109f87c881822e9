"""Attention over the paged KV cache.

`paged_attention` serves any mix of prefill chunks, prefix-cache extensions and decodes: the queries of
all sequences are packed `[T, Hq, D]`, `cu_seqlens_q` `[B+1]` delimits them, and `seq_lens` `[B]` is each
sequence's total length in the cache *including* its new tokens (already stored). Query `j` of a
sequence with `q_len` new tokens sits at position `seq_len - q_len + j` and attends causally.
`paged_decode_attention` is the one-query-per-sequence case, `q` shaped `[B, Hq, D]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one sequence from its blocks: `[length, Hkv, D]`."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [n, block_size, Hkv, D]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                              scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    starts, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        k = _gather_kv(k_cache, block_tables[b], seq_len).to(q.dtype)
        v = _gather_kv(v_cache, block_tables[b], seq_len).to(q.dtype)
        # [H, q_len, D] x [H, seq_len, D]; GQA by repeating each KV head over its query group.
        qh = q[q_start:q_end].transpose(0, 1)
        kh = k.transpose(0, 1).repeat_interleave(group, dim=0)
        vh = v.transpose(0, 1).repeat_interleave(group, dim=0)
        positions = torch.arange(seq_len - q_len, seq_len, device=q.device)
        mask = torch.arange(seq_len, device=q.device)[None, :] <= positions[:, None]
        attn = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        out[q_start:q_end] = attn.transpose(0, 1)
    return out


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                     scale: float) -> torch.Tensor:
    batch = q.shape[0]
    cu = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    return paged_attention_reference(q, k_cache, v_cache, block_tables, cu, seq_lens, scale)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return paged_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)
