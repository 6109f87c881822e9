"""The Triton attention kernels against the torch references, run by Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

from services.llm.kernels.attention import paged_attention_reference, paged_decode_attention_reference
from services.llm.kernels.attention_triton import (
    decode_num_splits,
    paged_attention_triton,
    paged_decode_attention_triton,
)
from tests.unit.llm.kernels.paged_cache import build_paged_cache, oracle_attention
from tests.unit.llm.kernels.triton_mode import requires_interpreter

pytestmark = requires_interpreter

BLOCK = 16


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(2, 2, 64), (6, 2, 64), (8, 1, 128)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_kernel_matches_reference(num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int) -> None:
    seq_lens = [1, 15, 16, 17, 45]  # odd, block-boundary ±1; 3 splits leave some splits empty for short ones
    k_cache, v_cache, tables = build_paged_cache(seq_lens, num_kv_heads, head_dim, BLOCK)
    q = torch.randn(len(seq_lens), num_heads, head_dim)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    got = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.1, num_splits=num_splits, block_n=16)
    want = paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# Only fp16 here: Triton 3.7.1's interpreter multiplies bf16 `tl.dot` operands as their raw 16-bit patterns (it
# stores bf16 as uint16 for numpy and converts only fp8 before the matmul); tests/gpu covers bf16.
def test_decode_kernel_half_precision() -> None:
    seq_lens = [9, 32]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 2, 64, BLOCK, dtype=torch.float16)
    q = torch.randn(2, 6, 64).half()
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    got = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.125, num_splits=2, block_n=16)
    want = paged_decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens, 0.125)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)


def test_decode_kernel_padding_rows_are_finite() -> None:
    k_cache, v_cache, tables = build_paged_cache([5, 1], 1, 64, BLOCK)
    q = torch.randn(2, 2, 64)
    out = paged_decode_attention_triton(q, k_cache, v_cache, tables, torch.tensor([5, 0], dtype=torch.int32), 0.1,
                                        num_splits=2, block_n=16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(2, 2, 64), (6, 2, 64), (8, 1, 128)])
def test_prefill_kernel_matches_reference(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    # Full prompt, prefix-cached extension, chunk ending on a block boundary, a decode, an idle sequence.
    q_lens = [17, 5, 16, 1, 0]
    seq_lens = [17, 37, 32, 9, 3]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, num_kv_heads, head_dim, BLOCK, seed=2)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), num_heads, head_dim)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    got = paged_attention_triton(q, k_cache, v_cache, tables, cu, lens, 0.1, block_m=16, block_n=16)
    want = paged_attention_reference(q, k_cache, v_cache, tables, cu, lens, 0.1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_with_tables_as_wide_as_max_model_len() -> None:
    # Under CUDA graphs the block tables are as wide as max_model_len, so the split count is sized for the
    # longest possible context; each sequence divides its own length over those splits.
    seq_lens = [3, 70, 200, 1]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 2, 64, BLOCK, seed=6)
    wide = torch.zeros(len(seq_lens), 4096 // BLOCK, dtype=torch.int32)
    wide[:, :tables.shape[1]] = tables.clamp(min=0)
    q = torch.randn(len(seq_lens), 6, 64)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    assert decode_num_splits(len(seq_lens), 2, 4096) == 16
    got = paged_decode_attention_triton(q, k_cache, v_cache, wide, lens, 0.1, block_n=16)
    torch.testing.assert_close(got, paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.1),
                               atol=1e-5, rtol=1e-5)


def test_prefill_rows_pack_the_query_group() -> None:
    # 8 query heads on 1 KV head: one row tile holds two queries' whole group, so tiles end mid-sequence.
    seq_lens = [3, 20, 50]  # with 3, 1 and 2 new queries (cu below)
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 1, 64, BLOCK, seed=7)
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    q = torch.randn(6, 8, 64)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    got = paged_attention_triton(q, k_cache, v_cache, tables, cu, lens, 0.1, max_query_len=3, block_m=16,
                                 block_n=16)
    want = oracle_attention(q, k_cache, v_cache, tables, cu.tolist(), seq_lens, 0.1)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_split_count_depends_on_shapes_only() -> None:
    assert decode_num_splits(batch=64, num_kv_heads=8, max_context=4096) == 1  # 512 programs already fill the GPU
    assert decode_num_splits(batch=1, num_kv_heads=8, max_context=32768) == 33
    assert decode_num_splits(batch=1, num_kv_heads=8, max_context=256) == 1  # too short to be worth splitting


@pytest.mark.parametrize(("block_size", "block_n"), [(8, 32), (32, 16)])
def test_tiles_that_span_or_split_blocks(block_size: int, block_n: int) -> None:
    # A key tile may cover several cache blocks or part of one; both must follow the block table.
    seq_lens = [31, 33, 64]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 2, 64, block_size, seed=3)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(3, 4, 64)
    got = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.1, num_splits=2, block_n=block_n)
    torch.testing.assert_close(got, paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.1),
                               atol=1e-5, rtol=1e-5)
    cu = torch.tensor([0, 5, 38, 40], dtype=torch.int32)
    q = torch.randn(40, 4, 64)
    got = paged_attention_triton(q, k_cache, v_cache, tables, cu, lens, 0.1, block_m=16, block_n=block_n)
    torch.testing.assert_close(got, paged_attention_reference(q, k_cache, v_cache, tables, cu, lens, 0.1),
                               atol=1e-5, rtol=1e-5)


def test_head_dim_that_is_not_a_power_of_two() -> None:
    seq_lens = [20, 7]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 1, 80, BLOCK, seed=4)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(2, 3, 80)
    got = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 0.1, block_n=16)
    torch.testing.assert_close(got, paged_decode_attention_reference(q, k_cache, v_cache, tables, lens, 0.1),
                               atol=1e-5, rtol=1e-5)


def test_prefill_kernel_half_precision_with_cached_prefix() -> None:
    seq_lens, q_lens = [40, 18], [9, 18]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 2, 64, BLOCK, dtype=torch.float16, seed=5)
    cu = torch.tensor([0, 9, 27], dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q = torch.randn(sum(q_lens), 8, 64).half()
    got = paged_attention_triton(q, k_cache, v_cache, tables, cu, lens, 0.125, block_m=16, block_n=16)
    want = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, cu, lens, 0.125)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2e-3)
