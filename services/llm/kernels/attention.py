"""Attention over the paged KV cache.

`paged_attention` serves any mix of prefill chunks, prefix-cache extensions and decodes: the queries of
all sequences are packed `[T, Hq, D]`, `cu_seqlens_q` `[B+1]` delimits them, and `seq_lens` `[B]` is each
sequence's total length in the cache *including* its new tokens (already stored). Query `j` of a
sequence with `q_len` new tokens sits at position `seq_len - q_len + j` and attends causally.
`paged_decode_attention` is the one-query-per-sequence case, `q` shaped `[B, Hq, D]`.

The torch references are the CPU production path: decode gathers the blocks of all sequences at once
(padded to the longest) and runs one masked batched attention; grouped-query heads are handled by viewing
the queries as `[B, Hkv, group, D]`, so keys and values are never repeated. The Triton kernels live in
`attention_triton.py` and are imported only when a CUDA tensor arrives.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from services.llm.kernels.dispatch import use_triton


def _gather_padded(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """The first `max_len` slots of every sequence's blocks: `[B, max_len, Hkv, D]` (tail beyond a
    sequence's length is whatever the table points at and must be masked)."""
    num_blocks, block_size = cache.shape[:2]
    used = (max_len + block_size - 1) // block_size
    # Tables may be padded with -1 or stale ids past a sequence's end; clamp so the gather stays in range.
    table = block_tables[:, :used].long().clamp(0, num_blocks - 1)
    # index_select on the flat table is several times faster on CPU than advanced indexing with a 2-D index.
    blocks = cache.index_select(0, table.reshape(-1))  # [B * used, block_size, Hkv, D]
    return blocks.view(table.shape[0], used * block_size, *cache.shape[2:])[:, :max_len]


# The padded gather copies keys and values; batches whose copy would exceed this run in slices.
_GATHER_BUDGET_BYTES = 256 * 2**20
# On CPU, decodes run in groups of this many sequences of similar length: each group pads only to its own
# longest, and its gathered keys and values stay in cache (4x faster than one padded batch of 32, measured).
_CPU_DECODE_GROUP = 8


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    batch = q.shape[0]
    if batch <= _CPU_DECODE_GROUP or q.device.type != "cpu":
        return _padded_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
    out = torch.empty_like(q)
    order = torch.argsort(seq_lens)
    for first in range(0, batch, _CPU_DECODE_GROUP):
        rows = order[first:first + _CPU_DECODE_GROUP]
        out[rows] = _padded_decode_attention(q[rows], k_cache, v_cache, block_tables[rows], seq_lens[rows], scale)
    return out


def _padded_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    max_len = max(1, int(seq_lens.max()))
    per_seq = 2 * max_len * k_cache.shape[2] * head_dim * k_cache.element_size()
    rows = max(1, _GATHER_BUDGET_BYTES // per_seq)
    if batch > rows:
        return torch.cat([_padded_decode_attention(q[i:i + rows], k_cache, v_cache, block_tables[i:i + rows],
                                                   seq_lens[i:i + rows], scale) for i in range(0, batch, rows)])
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k = _gather_padded(k_cache, block_tables, max_len).to(q.dtype).permute(0, 2, 1, 3)  # [B, Hkv, L, D]
    v = _gather_padded(v_cache, block_tables, max_len).to(q.dtype).permute(0, 2, 1, 3)
    qg = q.view(batch, num_kv_heads, group, head_dim)
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens.to(q.device)[:, None]  # [B, L]
    valid[:, 0] = True  # padded rows of length 0 (CUDA-graph padding) get a finite, discarded output, not NaN
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(batch, num_heads, head_dim)


def _sequence_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_len: int, scale: float) -> torch.Tensor:
    """Causal attention of one sequence's `q_len` new queries `[q_len, Hq, D]` over its `seq_len` tokens."""
    q_len, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k = _gather_padded(k_cache, block_table[None], seq_len)[0].to(q.dtype).transpose(0, 1)  # [Hkv, L, D]
    v = _gather_padded(v_cache, block_table[None], seq_len)[0].to(q.dtype).transpose(0, 1)
    if q_len == seq_len:
        # A whole prompt at once: plain causal attention, which takes SDPA's fused kernel (several times
        # faster on CPU than the masked path below).
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None], is_causal=True,
                                             scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    # The group's queries become extra rows of one matrix per KV head: [Hkv, group * q_len, D].
    qg = q.view(q_len, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(num_kv_heads, group * q_len,
                                                                                  head_dim)
    positions = torch.arange(seq_len - q_len, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= positions[:, None]  # [q_len, L]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask.repeat(group, 1), scale=scale)
    return out.view(num_kv_heads, group, q_len, head_dim).permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                              scale: float) -> torch.Tensor:
    out = torch.empty_like(q)
    starts, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    q_lens = [end - start for start, end in itertools.pairwise(starts)]
    decodes = [b for b, n in enumerate(q_lens) if n == 1]
    if decodes:
        # All single-query sequences go through one batched decode call.
        index = torch.tensor(decodes, device=q.device)
        rows = torch.tensor([starts[b] for b in decodes], device=q.device)
        out[rows] = _decode_attention(q[rows], k_cache, v_cache, block_tables[index], seq_lens.to(q.device)[index],
                                      scale)
    for b, q_len in enumerate(q_lens):
        if q_len > 1:
            start = starts[b]
            out[start:start + q_len] = _sequence_attention(q[start:start + q_len], k_cache, v_cache, block_tables[b],
                                                           lens[b], scale)
    return out


def paged_decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                     block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                     scale: float) -> torch.Tensor:
    if q.shape[0] == 0:
        return torch.empty_like(q)
    return _decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                    max_query_len: int | None = None) -> torch.Tensor:
    """`max_query_len` (the longest run of new queries, known on the host) spares the Triton launch a sync."""
    if use_triton(q):
        from services.llm.kernels import attention_triton

        return attention_triton.paged_attention_triton(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                                       scale, max_query_len=max_query_len)
    return paged_attention_reference(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    if use_triton(q):
        from services.llm.kernels import attention_triton

        return attention_triton.paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, scale)
