"""The torch references (the CPU production path) against the token-by-token oracle."""

from __future__ import annotations

import pytest
import torch

from services.llm.kernels.attention import paged_attention_reference, paged_decode_attention_reference
from tests.unit.llm.kernels.paged_cache import build_paged_cache, oracle_attention

BLOCK = 8


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_decode_reference_matches_oracle(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    seq_lens = [1, 7, 8, 9, 16, 23]  # odd, block-boundary and boundary ±1 lengths
    k_cache, v_cache, tables = build_paged_cache(seq_lens, num_kv_heads, head_dim, BLOCK)
    q = torch.randn(len(seq_lens), num_heads, head_dim)
    scale = head_dim ** -0.5
    got = paged_decode_attention_reference(q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32),
                                           scale)
    want = oracle_attention(q, k_cache, v_cache, tables, list(range(len(seq_lens) + 1)), seq_lens, scale)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (6, 2), (8, 1)])
def test_mixed_batch_reference_matches_oracle(num_heads: int, num_kv_heads: int) -> None:
    # Full prefill, prefix-cached extension, a chunk ending on a block boundary, decodes, and an idle sequence.
    q_lens = [9, 3, 8, 1, 1, 0, 5]
    seq_lens = [9, 20, 16, 17, 1, 4, 5]
    head_dim = 32
    k_cache, v_cache, tables = build_paged_cache(seq_lens, num_kv_heads, head_dim, BLOCK, seed=1)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], num_heads, head_dim)
    scale = 0.3
    got = paged_attention_reference(q, k_cache, v_cache, tables, torch.tensor(cu, dtype=torch.int32),
                                    torch.tensor(seq_lens, dtype=torch.int32), scale)
    want = oracle_attention(q, k_cache, v_cache, tables, cu, seq_lens, scale)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_decode_reference_in_bfloat16_stays_close() -> None:
    seq_lens = [5, 33]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 2, 64, BLOCK, dtype=torch.bfloat16)
    q = torch.randn(2, 8, 64).bfloat16()
    got = paged_decode_attention_reference(q, k_cache, v_cache, tables, torch.tensor(seq_lens), 0.125)
    want = oracle_attention(q, k_cache, v_cache, tables, [0, 1, 2], seq_lens, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)


def test_decode_reference_gives_finite_output_for_padding_rows() -> None:
    k_cache, v_cache, tables = build_paged_cache([4, 1], 2, 16, BLOCK)
    q = torch.randn(2, 2, 16)
    out = paged_decode_attention_reference(q, k_cache, v_cache, tables, torch.tensor([4, 0]), 0.25)
    assert torch.isfinite(out).all()


def test_decode_reference_slices_batches_over_the_gather_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.llm.kernels import attention

    seq_lens = [3, 30, 17, 8, 25]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 2, 16, BLOCK, seed=2)
    q = torch.randn(len(seq_lens), 4, 16)
    monkeypatch.setattr(attention, "_GATHER_BUDGET_BYTES", 2 * 30 * 2 * 16 * 4 * 2)  # two sequences per slice
    got = attention.paged_decode_attention_reference(q, k_cache, v_cache, tables, torch.tensor(seq_lens), 0.2)
    want = oracle_attention(q, k_cache, v_cache, tables, list(range(len(seq_lens) + 1)), seq_lens, 0.2)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_decode_reference_groups_large_cpu_batches_by_length() -> None:
    from services.llm.kernels import attention

    seq_lens = [29, 3, 17, 1, 40, 8, 9, 33, 16, 2, 24, 11, 5, 38, 7, 20, 13, 31, 6, 19]  # unsorted, > one group
    assert len(seq_lens) > 2 * attention._CPU_DECODE_GROUP
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 2, 16, BLOCK, seed=3)
    q = torch.randn(len(seq_lens), 6, 16)
    got = attention.paged_decode_attention_reference(q, k_cache, v_cache, tables, torch.tensor(seq_lens), 0.25)
    want = oracle_attention(q, k_cache, v_cache, tables, list(range(len(seq_lens) + 1)), seq_lens, 0.25)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
