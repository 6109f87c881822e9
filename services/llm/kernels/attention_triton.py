"""Triton kernels for attention over the paged KV cache (see `attention.py` for the layout and the references).

Decode: one program per (sequence, KV head, KV split) handles the whole query group of that KV head, so the
heads that share a KV head read it once. Contexts are cut into splits (flash-decoding): each split writes a
normalised partial output and its log-sum-exp, and a reduce kernel combines them. The number of splits
depends only on shapes, never on `seq_lens` values, so the decode launch needs no host sync and can be
captured in a CUDA graph; each program cuts its own sequence's length into that many parts on the device, so
a short context spreads over all splits even when the launch was sized for `max_model_len` (graphs).

Prefill / extend: one program per (tile of rows, sequence, KV head), where a row is one (new query, head of
the KV head's group) pair: the group's heads share each K/V tile they read, as in decode, and an extension of
a few tokens fills a tile with the whole group instead of padding. Query `j` sits at position
`seq_len - q_len + j`, so cached prefixes and earlier chunks are read from the paged cache like any other
key. Row tiles are the fastest grid axis, so the tiles that read the same sequence's K/V run side by side and
share it in L2. The launch's grid needs the longest query run, which the caller passes from the host
(`max_query_len`, known when the step is built), so a mixed step makes no host sync per layer.

Softmax runs in base 2 with fp32 statistics and accumulators for bf16 / fp16 / fp32 inputs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from services.llm.kernels.launches import launch

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, partial_ptr, lse_ptr,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    group, head_dim, num_splits,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DIRECT: tl.constexpr, PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    heads = kv_head * group + tl.arange(0, BLOCK_H)
    head_ok = tl.arange(0, BLOCK_H) < group
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                mask=head_ok[:, None] & dim_ok[None, :], other=0.0)

    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N  # this sequence's part, tile-aligned
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for tile in range(start, end, BLOCK_N):
        tokens = tile + tl.arange(0, BLOCK_N)
        token_ok = tokens < end
        blocks = tl.load(block_tables_ptr + seq * stride_bt + tokens // BLOCK_SIZE, mask=token_ok, other=0)
        offsets = tokens % BLOCK_SIZE
        k = tl.load(k_cache_ptr + blocks[:, None].to(tl.int64) * stride_kb + offsets[:, None] * stride_ks
                    + kv_head * stride_kh + dims[None, :], mask=token_ok[:, None] & dim_ok[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N]
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        v = tl.load(v_cache_ptr + blocks[:, None].to(tl.int64) * stride_vb + offsets[:, None] * stride_vs
                    + kv_head * stride_vh + dims[None, :], mask=token_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    # An empty split (its range lies past the sequence) contributes weight zero, not 0/0.
    has_tokens = l_i > 0
    out = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & dim_ok[None, :])
    else:
        base = seq * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(partial_ptr + base[:, None] + dims[None, :], out, mask=head_ok[:, None] & dim_ok[None, :])
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=head_ok)


@triton.jit
def _decode_reduce_kernel(
    partial_ptr, lse_ptr, out_ptr,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    num_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    lse = tl.load(lse_ptr + seq * stride_lb + head * stride_lh + splits, mask=split_ok, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp2(lse - top)
    total = tl.sum(weights, axis=0)
    partial = tl.load(partial_ptr + seq * stride_pb + head * stride_ph + splits[:, None] * stride_ps + dims[None, :],
                      mask=split_ok[:, None] & dim_ok[None, :], other=0.0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty), mask=dim_ok)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_ptr, seq_lens_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    group, head_dim,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row_tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)

    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens already in the cache before this step's queries

    # Row r of the tile is query r // group of this sequence, for head r % group of this KV head's group.
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    queries = rows // group
    heads = kv_head * group + rows % group
    row_ok = queries < q_len
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q_offsets = (q_start + queries)[:, None].to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    positions = context + queries

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Causal: the tile's last query sees up to its own position; tiles past the sequence's rows run no iterations.
    last_query = tl.minimum((row_tile * BLOCK_M + BLOCK_M - 1) // group, q_len - 1)
    end = tl.where(row_tile * BLOCK_M < q_len * group, context + last_query + 1, 0)
    for tile in range(0, end, BLOCK_N):
        tokens = tile + tl.arange(0, BLOCK_N)
        token_ok = tokens < end
        blocks = tl.load(block_tables_ptr + seq * stride_bt + tokens // BLOCK_SIZE, mask=token_ok, other=0)
        offsets = tokens % BLOCK_SIZE
        k = tl.load(k_cache_ptr + blocks[:, None].to(tl.int64) * stride_kb + offsets[:, None] * stride_ks
                    + kv_head * stride_kh + dims[None, :], mask=token_ok[:, None] & dim_ok[None, :], other=0.0)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        visible = token_ok[None, :] & (tokens[None, :] <= positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # Rows that have seen nothing yet keep m = -inf; subtract 0 instead so exp2 stays finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        v = tl.load(v_cache_ptr + blocks[:, None].to(tl.int64) * stride_vb + offsets[:, None] * stride_vs
                    + kv_head * stride_vh + dims[None, :], mask=token_ok[:, None] & dim_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_offsets = (q_start + queries)[:, None].to(tl.int64) * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + o_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    # fp32 caches get exact fp32 dot products; tf32 would cost ~3 digits against the reference.
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def decode_num_splits(batch: int, num_kv_heads: int, max_context: int, target_programs: int = 264,
                      min_split_tokens: int = 256) -> int:
    """How many KV splits a decode launch uses: enough programs to fill the GPU (default: two waves of an
    H100's 132 SMs), never splits shorter than `min_split_tokens`. Depends on shapes only."""
    programs = max(1, batch * num_kv_heads)
    by_occupancy = triton.cdiv(target_programs, programs)
    by_length = max(1, max_context // min_split_tokens)
    return max(1, min(by_occupancy, by_length, 64))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs a decode launch aims for: two waves over the GPU's multiprocessors."""
    if device.type != "cuda":
        return 264  # the interpreter on the CPU: pretend to be an H100
    return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                                  num_splits: int | None = None, block_n: int = 64, num_warps: int = 4,
                                  num_stages: int = 2) -> torch.Tensor:
    """`q` `[B, Hq, D]` → `[B, Hq, D]`. `num_splits=None` picks the split count from shapes (see
    `decode_num_splits`); pass an int to force it (tests force the split path on tiny shapes, the kernel
    benchmark sweeps it with the tile and launch settings)."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert num_heads % num_kv_heads == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = q if q.stride(-1) == 1 else q.contiguous()
    group = num_heads // num_kv_heads
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    max_context = block_tables.shape[1] * block_size
    splits = num_splits or decode_num_splits(batch, num_kv_heads, max_context, target_programs(q.device))
    block_d = _block_d(head_dim)
    if splits == 1:
        partial, lse = out, out  # unused by the direct path
    else:
        partial = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    launch(
        _decode_split_kernel, (batch, num_kv_heads, splits),
        q, k_cache, v_cache, block_tables, seq_lens, out, partial, lse,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        partial.stride(0), partial.stride(1), partial.stride(2) if splits > 1 else 0,
        lse.stride(0), lse.stride(1),
        group, head_dim, splits,
        BLOCK_SIZE=block_size, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        DIRECT=splits == 1, PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        launch(
            _decode_reduce_kernel, (batch, num_heads),
            partial, lse, out,
            partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            splits, head_dim,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d,
        )
    return out


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           max_query_len: int | None = None, block_m: int = 64, block_n: int = 64,
                           num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Packed queries `[T, Hq, D]` of a mixed batch → `[T, Hq, D]` (causal over each sequence's cache).
    `max_query_len`: the longest run of new queries in the batch; read from `cu_seqlens_q` (a host sync)
    only when the caller does not know it."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    assert num_heads % num_kv_heads == 0 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=q.dtype, device=q.device)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    group = num_heads // num_kv_heads
    rows = max_query_len * group
    block_m = min(block_m, max(16, triton.next_power_of_2(rows)))
    launch(
        _prefill_kernel, (triton.cdiv(rows, block_m), batch, num_kv_heads),
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        group, head_dim,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
        PRECISION=_precision(q.dtype), num_warps=num_warps, num_stages=num_stages,
    )
    return out
