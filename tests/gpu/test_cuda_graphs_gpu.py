"""The decode graph runner replays what the eager step computes, and its padding rows leave the cache alone."""

from __future__ import annotations

import pytest
import torch

from services.llm.kernels.attention import paged_decode_attention
from services.llm.kernels.cuda_graphs import DecodeGraphRunner
from services.llm.kernels.kv_store import store_kv

pytestmark = pytest.mark.gpu

NUM_BLOCKS, BLOCK, HKV, HQ, DIM, MAX_BLOCKS = 128, 16, 2, 8, 64, 8


def _decode_step(k_cache: torch.Tensor, v_cache: torch.Tensor):
    def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        q, kv = inputs["q"], inputs["kv"]
        store_kv(kv[:, 0], kv[:, 1], k_cache, v_cache, inputs["slot_mapping"])
        return paged_decode_attention(q, k_cache, v_cache, inputs["block_tables"], inputs["seq_lens"], DIM ** -0.5)
    return step


def test_replay_matches_eager_and_skips_padding() -> None:
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    k_cache = torch.randn(NUM_BLOCKS, BLOCK, HKV, DIM, device=device, generator=gen)
    v_cache = torch.randn(NUM_BLOCKS, BLOCK, HKV, DIM, device=device, generator=gen)
    buffers = {
        "q": torch.zeros(8, HQ, DIM, device=device),
        "kv": torch.zeros(8, 2, HKV, DIM, device=device),
        "slot_mapping": torch.full((8,), -1, dtype=torch.long, device=device),
        "block_tables": torch.zeros(8, MAX_BLOCKS, dtype=torch.int32, device=device),
        "seq_lens": torch.zeros(8, dtype=torch.int32, device=device),
    }
    runner = DecodeGraphRunner(_decode_step(k_cache, v_cache), buffers, padding={"slot_mapping": -1, "seq_lens": 0},
                               capture_sizes=[1, 2, 4, 8])
    runner.capture()
    assert runner.padded_size(3) == 4 and runner.padded_size(9) is None

    for batch in (3, 8, 1):
        seq_lens = torch.randint(1, MAX_BLOCKS * BLOCK, (batch,), device=device, dtype=torch.int32)
        tables = torch.randperm(NUM_BLOCKS, device=device)[: batch * MAX_BLOCKS].view(batch, MAX_BLOCKS).int()
        last = (seq_lens - 1).long()
        slots = tables.gather(1, (last // BLOCK)[:, None]).squeeze(1).long() * BLOCK + last % BLOCK
        inputs = {"q": torch.randn(batch, HQ, DIM, device=device), "kv": torch.randn(batch, 2, HKV, DIM, device=device),
                  "slot_mapping": slots, "block_tables": tables, "seq_lens": seq_lens}
        before = k_cache.clone()
        replayed = runner.run(inputs).clone()
        written = (k_cache != before).any(-1).any(-1).view(-1).nonzero().squeeze(1)
        # Only the live rows' slots changed: padding rows (slot -1) wrote nothing.
        assert set(written.tolist()) <= set(slots.tolist())
        eager = _decode_step(k_cache, v_cache)(inputs)
        torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)
