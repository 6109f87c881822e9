"""Perplexity of a text under a loaded model: one prefill over its tokens, scored on each next token.

The quality check of a weight format (int8 or fp8 against the dtype's own weights) and of an fp8 KV cache, used
by the tests and by `bench/llm_quantization.py`.
"""

from __future__ import annotations

import math

import torch

from services.llm.engine.runner import allocate_kv_cache
from services.llm.layers.attention import AttentionMetadata
from services.llm.loader import LoadedModel


@torch.inference_mode()
def prompt_logits(loaded: LoadedModel, token_ids: list[int], device: torch.device, dtype: torch.dtype,
                  block_size: int = 16, kv_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The fp32 logits `[len(token_ids), vocab]` of one prefill over `token_ids`. `kv_dtype`: the KV cache's
    element type (None: `dtype`); the prefill's attention reads what the cache holds."""
    n = len(token_ids)
    num_blocks = -(-n // block_size)
    allocate_kv_cache(loaded.model, loaded.config, num_blocks, block_size, kv_dtype or dtype, device)
    positions = torch.arange(n, device=device)
    meta = AttentionMetadata(slot_mapping=positions.clone(),
                             block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None, :],
                             cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=device),
                             seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
                             decode_only=False, max_query_len=n)
    hidden = loaded.model(torch.tensor(token_ids, device=device), positions, meta)
    return loaded.model.compute_logits(hidden).float()


def perplexity(loaded: LoadedModel, token_ids: list[int], device: torch.device, dtype: torch.dtype,
               block_size: int = 16, kv_dtype: torch.dtype | None = None) -> float:
    assert len(token_ids) >= 2, "perplexity needs at least two tokens"
    logits = prompt_logits(loaded, token_ids, device, dtype, block_size, kv_dtype)[:-1]
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(token_ids[1:], device=device))
    return math.exp(float(nll))
