"""Attention over the paged KV cache: store the step's keys and values, then attend.

Every layer gets the same `AttentionMetadata` for a step; the runner binds each layer's cache tensors once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from services.llm.kernels import attention, attention_cpu, kv_store


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: where each new token's key and value go
    block_tables: torch.Tensor  # [B, max_blocks] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: each sequence's new tokens within the packed batch
    seq_lens: torch.Tensor  # [B] int32: total length in the cache, new tokens included
    decode_only: bool  # one new token per sequence: the cheaper decode kernel applies
    cpu_plan: attention_cpu.CpuAttentionPlan | None = None  # CPU steps: the attention work planned once per step
    max_query_len: int | None = None  # longest run of new tokens, from the host (None: the kernel reads it)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        self.k_scale = self.v_scale = 1.0

    def bind_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: float = 1.0,
                   v_scale: float = 1.0) -> None:
        """`k_scale`/`v_scale`: the cache holds keys and values divided by these (powers of two; see kv_store)."""
        self.k_cache, self.v_cache = k_cache, v_cache
        self.k_scale, self.v_scale = k_scale, v_scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q `[T, Hq, D]`, k and v `[T, Hkv, D]` → `[T, Hq, D]`."""
        # A scaled cache: keys and values go in divided by their scales; the key scale joins the softmax scale
        # (q·k = k_scale * q·k_stored) and the value scale multiplies the output. Powers of two: all exact.
        if self.k_scale != 1.0:
            k = k * (1.0 / self.k_scale)
        if self.v_scale != 1.0:
            v = v * (1.0 / self.v_scale)
        scale = self.scale * self.k_scale
        if meta.cpu_plan is not None:
            out = attention_cpu.cpu_paged_attention(q, k, v, self.k_cache, self.v_cache, meta.cpu_plan, scale)
        else:
            kv_store.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
            if meta.decode_only:
                out = attention.paged_decode_attention(q, self.k_cache, self.v_cache, meta.block_tables,
                                                       meta.seq_lens, scale)
            else:
                out = attention.paged_attention(q, self.k_cache, self.v_cache, meta.block_tables, meta.cu_seqlens_q,
                                                meta.seq_lens, scale, max_query_len=meta.max_query_len)
        return out if self.v_scale == 1.0 else out * self.v_scale
