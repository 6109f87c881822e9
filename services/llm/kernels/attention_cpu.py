"""The CPU production path of paged attention: a per-step plan, then per-layer work that reads what it can in place.

Everything that is the same for the 30-odd layers of one step (which rows decode, how decodes are grouped,
which cache blocks each group reads, the masks, which prefills are whole prompts) is worked out once per
step by `plan_cpu_attention`, from the host-side lists the runner already has, so a layer does no host
syncs and no index arithmetic. Per layer, `cpu_paged_attention`:
- stores the step's keys and values into their cache slots (`index_copy_`, no masking: CPU steps have no
  padding rows), cast to the cache's dtype (fp8 for `LLM_KV_CACHE_DTYPE=fp8`);
- prefills (whole prompts, prefix-cache extensions, later chunks) run in the C prefill kernel of
  `paged_attention_cpu` where the engine has it (bf16 on AVX512-BF16): each reads its blocks in place and
  attends causally from its first new token's position. Otherwise whole prompts attend over the layer's
  fresh keys and values with SDPA, as cast for the cache (they are the cache's contents for those tokens, so
  they are read in place), and extensions and later chunks gather their sequence's blocks once;
- decodes run in the C kernel of `paged_attention_cpu` when the engine has it (each row's blocks read in
  place, no copy); otherwise in groups of similar length, each padded only to its own longest and gathered
  with one `index_select` into a buffer small enough to stay in cache. With the kernel, extensions of up to
  `KERNEL_MAX_QUERIES` tokens (speculative verification, short prompts after a cached prefix) run in it too,
  each query as a decode of the sequence's first `position + 1` tokens: that is their causal mask.

`attention.paged_attention_reference` stays the oracle (the Triton tests use it); this path is checked
against the same token-by-token oracle in tests/unit/llm/kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from services.llm.kernels.kv_store import to_cache_dtype
from services.llm.kernels.paged_attention_cpu import DecodeKernel, KernelDecodes, KernelPrefills, PrefillKernel

# Decode groups are cut so one group's gathered keys and values stay within this (about the L2 cache).
DECODE_GROUP_BYTES = 2 * 2**20
# ... and so that padding to the group's longest wastes at most this share of the gathered slots.
DECODE_GROUP_MAX_PADDING = 0.25
# Extensions up to this many tokens attend in the kernel, which reads the sequence's keys once per query;
# longer ones gather once and run SDPA.
KERNEL_MAX_QUERIES = 8


@dataclass(slots=True)
class DecodeGroup:
    rows: torch.Tensor | None  # query rows of the step (None: all rows, in order)
    blocks: torch.Tensor  # [B_g * num_blocks] int64: every block the group reads, row by row
    num_blocks: int  # blocks per row (the longest row's)
    max_len: int
    mask: torch.Tensor | None  # [B_g, 1, 1, max_len] bool: None when every row has max_len tokens


@dataclass(slots=True)
class PrefillSequence:
    q_start: int
    q_len: int
    seq_len: int
    blocks: torch.Tensor | None  # int64 block ids to gather; None for a whole prompt (read in place)
    mask: torch.Tensor | None  # [q_len, seq_len] bool, causal from position seq_len - q_len


@dataclass(slots=True)
class CpuAttentionPlan:
    slots: torch.Tensor  # [T] int64: cache slot of every new token
    decodes: list[DecodeGroup] = field(default_factory=list)  # the torch path's
    prefills: list[PrefillSequence] = field(default_factory=list)
    kernel: DecodeKernel | None = None  # the decodes run in the C kernel, from `kernel_decodes`
    kernel_decodes: KernelDecodes | None = None
    prefill_kernel: PrefillKernel | None = None  # the prefills run in the C prefill kernel, from `kernel_prefills`
    kernel_prefills: KernelPrefills | None = None


def plan_cpu_attention(num_new_tokens: list[int], seq_lens: list[int], block_tables: torch.Tensor,
                       slot_mapping: torch.Tensor, block_size: int, kv_bytes_per_token: int,
                       kernel: DecodeKernel | None = None,
                       prefill_kernel: PrefillKernel | None = None) -> CpuAttentionPlan:
    """The step's attention plan. `kv_bytes_per_token`: one layer's key plus value bytes for one token;
    `kernel` and `prefill_kernel`: the decode and prefill kernels, where the engine has them for its dtypes and
    shapes (None: the torch path)."""
    plan = CpuAttentionPlan(slots=slot_mapping, kernel=kernel, prefill_kernel=prefill_kernel)
    prefill_seqs: list[int] = []
    prefill_starts: list[int] = []
    decode_seqs: list[int] = []
    decode_rows: list[int] = []  # where each decode's query sits among the step's tokens
    decode_lens: list[int] = []  # the tokens it attends to
    q_start = 0
    for b, (q_len, seq_len) in enumerate(zip(num_new_tokens, seq_lens, strict=True)):
        if q_len == 1 or (kernel is not None and 1 < q_len <= KERNEL_MAX_QUERIES and q_len < seq_len):
            decode_seqs += [b] * q_len
            decode_rows += range(q_start, q_start + q_len)
            decode_lens += range(seq_len - q_len + 1, seq_len + 1)
        elif q_len > 1 and prefill_kernel is not None:
            prefill_seqs.append(b)
            prefill_starts.append(q_start)
        elif q_len > 1:
            plan.prefills.append(_plan_prefill(q_start, q_len, seq_len, block_tables[b], block_size))
        q_start += q_len
    if prefill_seqs:
        plan.kernel_prefills = KernelPrefills(
            q_starts=torch.tensor(prefill_starts, dtype=torch.long),
            q_lens=torch.tensor([num_new_tokens[b] for b in prefill_seqs], dtype=torch.int32),
            seq_lens=torch.tensor([seq_lens[b] for b in prefill_seqs], dtype=torch.int32),
            block_tables=block_tables[prefill_seqs].to(torch.int32).contiguous())
    if decode_seqs and kernel is not None:
        tables = block_tables if decode_seqs == list(range(len(seq_lens))) else block_tables[decode_seqs]
        plan.kernel_decodes = KernelDecodes(rows=torch.tensor(decode_rows, dtype=torch.long),
                                            block_tables=tables.to(torch.int32).contiguous(),
                                            seq_lens=torch.tensor(decode_lens, dtype=torch.int32))
    elif decode_seqs:
        plan.decodes = _plan_decodes(decode_seqs, decode_rows, decode_lens, block_tables,
                                     block_size, kv_bytes_per_token, all_rows=len(decode_rows) == q_start)
    return plan


def _plan_prefill(q_start: int, q_len: int, seq_len: int, table: torch.Tensor, block_size: int) -> PrefillSequence:
    if q_len == seq_len:
        return PrefillSequence(q_start, q_len, seq_len, None, None)
    num_blocks = -(-seq_len // block_size)
    positions = torch.arange(seq_len - q_len, seq_len)
    mask = torch.arange(seq_len)[None, :] <= positions[:, None]
    return PrefillSequence(q_start, q_len, seq_len, table[:num_blocks].long(), mask)


def _plan_decodes(seqs: list[int], rows: list[int], lens: list[int], block_tables: torch.Tensor, block_size: int,
                  kv_bytes_per_token: int, all_rows: bool) -> list[DecodeGroup]:
    order = sorted(range(len(rows)), key=lambda i: lens[i])
    groups: list[list[int]] = [[]]
    for i in order:
        candidate = groups[-1] + [i]
        longest = lens[i]  # sorted: the newcomer is the longest
        padded = longest * len(candidate)
        wasted = 1 - sum(lens[j] for j in candidate) / padded
        if groups[-1] and (padded * kv_bytes_per_token > DECODE_GROUP_BYTES or wasted > DECODE_GROUP_MAX_PADDING):
            groups.append([i])
        else:
            groups[-1] = candidate
    plans = []
    for members in groups:
        step_rows = [rows[i] for i in members]
        group_lens = [lens[i] for i in members]
        max_len = max(group_lens)
        num_blocks = -(-max_len // block_size)
        table = block_tables[[seqs[i] for i in members], :num_blocks].long().clamp_(min=0)  # past the end: masked
        mask = None
        if min(group_lens) < max_len:
            mask = (torch.arange(max_len)[None, :] < torch.tensor(group_lens)[:, None])[:, None, None, :]
        identity = all_rows and step_rows == list(range(len(rows)))
        plans.append(DecodeGroup(rows=None if identity else torch.tensor(step_rows), blocks=table.reshape(-1),
                                 num_blocks=num_blocks, max_len=max_len, mask=mask))
    return plans


def cpu_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, plan: CpuAttentionPlan, scale: float) -> torch.Tensor:
    """q `[T, Hq, D]`, k and v `[T, Hkv, D]` (this step's) → `[T, Hq, D]`; stores k and v in the cache first."""
    # What the cache holds (the same tensors when it is in the model's dtype); whole prompts attend over these.
    k, v = to_cache_dtype(k, k_cache.dtype), to_cache_dtype(v, v_cache.dtype)
    _write(k_cache, plan.slots, k)
    _write(v_cache, plan.slots, v)
    out = torch.empty_like(q)
    for prefill in plan.prefills:
        _prefill(q, k, v, k_cache, v_cache, prefill, scale, out)
    if plan.kernel_prefills is not None:
        plan.prefill_kernel(q, k_cache, v_cache, plan.kernel_prefills, scale, out)
    if plan.kernel_decodes is not None:
        plan.kernel(q, k_cache, v_cache, plan.kernel_decodes, scale, out)
    for group in plan.decodes:
        _decode(q, k_cache, v_cache, group, scale, out)
    return out


def _write(cache: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
    if cache.element_size() == 1:  # fp8: torch's CPU index_copy_ has no fp8 kernel, a byte copy is the same
        cache, rows = cache.view(torch.uint8), rows.view(torch.uint8)
    cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, rows)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             seq: PrefillSequence, scale: float, out: torch.Tensor) -> None:
    span = slice(seq.q_start, seq.q_start + seq.q_len)
    qs = q[span].transpose(0, 1)[None]  # [1, Hq, q_len, D]
    if seq.blocks is None:  # a whole prompt: its keys and values are this step's
        keys, values = k[span].transpose(0, 1)[None], v[span].transpose(0, 1)[None]
        result = F.scaled_dot_product_attention(qs, keys.to(q.dtype), values.to(q.dtype), is_causal=True,
                                                scale=scale, enable_gqa=True)
    else:
        keys = _gather(k_cache, seq.blocks, seq.seq_len)[0].transpose(0, 1)[None]  # [1, Hkv, L, D]
        values = _gather(v_cache, seq.blocks, seq.seq_len)[0].transpose(0, 1)[None]
        result = F.scaled_dot_product_attention(qs, keys.to(q.dtype), values.to(q.dtype), attn_mask=seq.mask,
                                                scale=scale, enable_gqa=True)
    out[span] = result[0].transpose(0, 1)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: DecodeGroup, scale: float,
            out: torch.Tensor) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    qg = q if group.rows is None else q.index_select(0, group.rows)
    rows = qg.shape[0]
    keys = _gather(k_cache, group.blocks, group.max_len, rows).permute(0, 2, 1, 3)  # [B_g, Hkv, L, D]
    values = _gather(v_cache, group.blocks, group.max_len, rows).permute(0, 2, 1, 3)
    # A KV head's query heads become the "query length" of one attention: keys are never repeated.
    queries = qg.view(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    result = F.scaled_dot_product_attention(queries, keys.to(q.dtype), values.to(q.dtype), attn_mask=group.mask,
                                            scale=scale).reshape(rows, num_heads, head_dim)
    if group.rows is None:
        out.copy_(result)
    else:
        out.index_copy_(0, group.rows, result)


def _gather(cache: torch.Tensor, blocks: torch.Tensor, max_len: int, rows: int = 1) -> torch.Tensor:
    """`[rows, max_len, Hkv, D]`: the first max_len slots of each row's blocks (one index_select for all rows)."""
    gathered = cache.index_select(0, blocks)  # [rows * num_blocks, block_size, Hkv, D]
    return gathered.view(rows, -1, *cache.shape[2:])[:, :max_len]
