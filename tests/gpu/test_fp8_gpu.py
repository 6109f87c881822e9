"""fp8 (e4m3) kernels compiled on a GPU of compute capability 8.9+ (L40S, L4, H100), realistic shapes, against the
torch references: the weight-only fp8 GEMM, the fp8 KV store, and attention over an fp8 pool."""

from __future__ import annotations

import os

import pytest
import torch

from services.llm.kernels.attention import paged_attention_reference, paged_decode_attention_reference
from services.llm.kernels.fp8_matmul import fp8_matmul, quantize_fp8_per_channel
from services.llm.kernels.kv_store import FP8_KV_DTYPE, store_kv, store_kv_reference
from tests.unit.llm.kernels.paged_cache import build_paged_cache


def _has_fp8() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled Triton, not the interpreter"),
    pytest.mark.skipif(not _has_fp8(), reason="fp8 e4m3 needs compute capability 8.9+"),
]

BLOCK = 16


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_fp8_gemm_bf16(rows: int) -> None:
    """Llama-3-8B's down projection (14336 -> 4096): the Triton kernel against the same weights widened to fp32."""
    w8, scale = quantize_fp8_per_channel(torch.randn(4096, 14336) * 0.02)
    x = torch.randn(rows, 14336).bfloat16().cuda()
    got = fp8_matmul(x, w8.cuda(), scale.bfloat16().cuda())
    want = x.float() @ (w8.float() * scale.bfloat16().float()[:, None]).cuda().T
    torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)


def test_fp8_store_kv_writes_the_reference_bytes() -> None:
    qkv = torch.randn(300, 48, 128, dtype=torch.bfloat16, device="cuda") * 40  # some past 448: saturation
    key, value = qkv[:, 32:40], qkv[:, 40:48]
    slots = torch.randperm(64 * BLOCK, device="cuda")[:300]
    slots[::7] = -1
    caches = [torch.zeros(64, BLOCK, 8, 128, dtype=FP8_KV_DTYPE, device="cuda") for _ in range(4)]
    store_kv(key, value, caches[0], caches[1], slots)
    store_kv_reference(key, value, caches[2], caches[3], slots)
    for ours, reference in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(ours.view(torch.uint8), reference.view(torch.uint8))


def test_attention_over_an_fp8_pool_bf16() -> None:
    from services.llm.kernels.attention_triton import paged_attention_triton, paged_decode_attention_triton

    seq_lens = [1, 15, 16, 17, 700, 2000]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 4, 128, BLOCK, dtype=FP8_KV_DTYPE)
    lens = torch.tensor(seq_lens, dtype=torch.int32).cuda()
    k_cache, v_cache, tables = k_cache.cuda(), v_cache.cuda(), tables.cuda()
    q = torch.randn(len(seq_lens), 28, 128).bfloat16().cuda()
    got = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, 128 ** -0.5)
    want = paged_decode_attention_reference(q.float(), k_cache, v_cache, tables, lens, 128 ** -0.5)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    q_lens = [1, 15, 16, 5, 300, 64]
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32).cuda()
    q = torch.randn(sum(q_lens), 28, 128).bfloat16().cuda()
    got = paged_attention_triton(q, k_cache, v_cache, tables, cu, lens, 128 ** -0.5, max_query_len=max(q_lens))
    want = paged_attention_reference(q.float(), k_cache, v_cache, tables, cu, lens, 128 ** -0.5)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
