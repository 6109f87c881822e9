"""The CPU production attention (planned once per step, prompts read in place) against the token-by-token oracle."""

from __future__ import annotations

import pytest
import torch

from services.llm.kernels import attention_cpu
from services.llm.kernels.attention_cpu import cpu_paged_attention, plan_cpu_attention
from tests.unit.llm.kernels.paged_cache import build_paged_cache, oracle_attention

BLOCK = 8


def slot_mapping(tables: torch.Tensor, q_lens: list[int], seq_lens: list[int]) -> torch.Tensor:
    slots = [int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK
             for b, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens, strict=True))
             for p in range(seq_len - q_len, seq_len)]
    return torch.tensor(slots, dtype=torch.long)


def run_step(q_lens: list[int], seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int,
             dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Our output and the oracle's, for a step whose new keys and values arrive as tensors (as from a layer)."""
    k_cache, v_cache, tables = build_paged_cache(seq_lens, num_kv_heads, head_dim, BLOCK, dtype=dtype, seed=seed)
    slots = slot_mapping(tables, q_lens, seq_lens)
    flat = (-1, num_kv_heads, head_dim)
    # The step's new keys and values, as the layer computed them; the cache holds them only after the store.
    k_new, v_new = k_cache.view(flat)[slots].clone(), v_cache.view(flat)[slots].clone()
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], num_heads, head_dim, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    want = oracle_attention(q, k_cache, v_cache, tables, cu, seq_lens, 0.3)
    k_cache.view(flat)[slots] = 0  # proves the store happens before anything reads the new tokens
    v_cache.view(flat)[slots] = 0
    plan = plan_cpu_attention(q_lens, seq_lens, tables, slots, BLOCK, 2 * num_kv_heads * head_dim * 4)
    return cpu_paged_attention(q, k_new, v_new, k_cache, v_cache, plan, 0.3), want


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2), (8, 1)])
def test_mixed_step_matches_oracle(num_heads: int, num_kv_heads: int) -> None:
    # Whole prompts (read in place), a prefix-cached extension, a chunk ending on a block boundary, decodes.
    q_lens = [9, 3, 8, 1, 1, 5, 1]
    seq_lens = [9, 20, 16, 17, 1, 5, 30]
    got, want = run_step(q_lens, seq_lens, num_heads, num_kv_heads, 32)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("group_bytes", [attention_cpu.DECODE_GROUP_BYTES, 1])
def test_decode_step_matches_oracle_in_one_group_or_many(group_bytes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention_cpu, "DECODE_GROUP_BYTES", group_bytes)
    seq_lens = [29, 3, 17, 1, 40, 8, 9, 33, 16, 2, 24, 11, 5, 38, 7, 20]  # unsorted, block boundaries ±1
    got, want = run_step([1] * len(seq_lens), seq_lens, 6, 2, 16, seed=3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_decode_groups_follow_length_and_padding() -> None:
    lens = [100, 101, 102, 10, 11, 400]
    tables = torch.zeros(len(lens), 64, dtype=torch.int32)
    plan = plan_cpu_attention([1] * len(lens), lens, tables, torch.zeros(len(lens), dtype=torch.long), BLOCK, 768)
    groups = [sorted(g.rows.tolist()) if g.rows is not None else list(range(len(lens))) for g in plan.decodes]
    assert groups == [[3, 4], [0, 1, 2], [5]]  # similar lengths together; none padded by more than a quarter
    assert [g.max_len for g in plan.decodes] == [11, 102, 400]
    assert plan.decodes[2].mask is None  # a row alone needs no mask


def test_bfloat16_step_stays_close() -> None:
    got, want = run_step([6, 1, 1], [6, 33, 5], 8, 2, 64, dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)
