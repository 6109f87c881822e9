"""Compiled Triton kernels on a GPU, realistic shapes, against the torch references run in fp32."""

from __future__ import annotations

import os

import pytest
import torch

from services.llm.kernels.activation import silu_and_mul_reference
from services.llm.kernels.attention import paged_attention_reference, paged_decode_attention_reference
from services.llm.kernels.kv_store import store_kv_reference
from services.llm.kernels.norm import fused_add_rms_norm_reference, rms_norm_reference
from services.llm.kernels.rotary import apply_rotary_reference, build_cos_sin_cache
from tests.unit.llm.kernels.paged_cache import build_paged_cache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled Triton, not the interpreter"),
]

BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}
BLOCK = 16


def _on_gpu(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.cuda() for t in tensors]


def _decode_lengths(batch: int, max_len: int) -> list[int]:
    gen = torch.Generator().manual_seed(batch)
    edges = [1, BLOCK - 1, BLOCK, BLOCK + 1, max_len]
    return (edges + torch.randint(1, max_len + 1, (batch,), generator=gen).tolist())[:batch]


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 32, 128), (32, 8, 128), (32, 4, 64),
                                                                     (28, 4, 128), (14, 2, 64)])
@pytest.mark.parametrize("num_splits", [None, 1, 5])
def test_decode_attention_bf16(num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int | None) -> None:
    from services.llm.kernels.attention_triton import paged_decode_attention_triton

    seq_lens = _decode_lengths(24, 2000)
    k_cache, v_cache, tables = build_paged_cache(seq_lens, num_kv_heads, head_dim, BLOCK, dtype=torch.bfloat16)
    q = torch.randn(len(seq_lens), num_heads, head_dim).bfloat16()
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q, k_cache, v_cache, tables, lens = _on_gpu(q, k_cache, v_cache, tables, lens)
    got = paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, num_splits=num_splits)
    want = paged_decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens,
                                            head_dim ** -0.5)
    torch.testing.assert_close(got.float(), want, **BF16_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_attention_other_dtypes(dtype: torch.dtype) -> None:
    from services.llm.kernels.attention import paged_decode_attention

    seq_lens = _decode_lengths(8, 700)
    k_cache, v_cache, tables = build_paged_cache(seq_lens, 8, 128, BLOCK, dtype=dtype)
    q = torch.randn(len(seq_lens), 32, 128).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q, k_cache, v_cache, tables, lens = _on_gpu(q, k_cache, v_cache, tables, lens)
    got = paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.088)  # the public, dispatching entry point
    want = paged_decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, lens, 0.088)
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 3e-3, "rtol": 3e-3}
    torch.testing.assert_close(got.float(), want, **tol)


@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(32, 8, 128), (16, 16, 64), (24, 3, 64)])
def test_prefill_attention_bf16(num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    from services.llm.kernels.attention_triton import paged_attention_triton

    # Fresh prompt, prefix-cached extension, decode, a chunk ending on a block boundary, a long chunk.
    q_lens = [500, 100, 1, 64, 1000]
    seq_lens = [500, 417, 1200, 320, 1999]
    k_cache, v_cache, tables = build_paged_cache(seq_lens, num_kv_heads, head_dim, BLOCK, dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu[-1]), num_heads, head_dim).bfloat16()
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    q, k_cache, v_cache, tables, cu, lens = _on_gpu(q, k_cache, v_cache, tables, cu, lens)
    got = paged_attention_triton(q, k_cache, v_cache, tables, cu, lens, head_dim ** -0.5)
    want = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), tables, cu, lens, head_dim ** -0.5)
    torch.testing.assert_close(got.float(), want, **BF16_TOL)


def test_store_kv_bf16() -> None:
    from services.llm.kernels.kv_store import store_kv

    qkv = torch.randn(300, 48, 128, dtype=torch.bfloat16, device="cuda")
    key, value = qkv[:, 32:40], qkv[:, 40:48]
    slots = torch.randperm(64 * BLOCK, device="cuda")[:300]
    slots[::7] = -1
    caches = [torch.zeros(64, BLOCK, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(4)]
    store_kv(key, value, caches[0], caches[1], slots)
    store_kv_reference(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("hidden", [576, 4096])
def test_rms_norm_bf16(hidden: int) -> None:
    from services.llm.kernels.norm import fused_add_rms_norm, rms_norm

    x, residual = torch.randn(2, 257, hidden, dtype=torch.bfloat16, device="cuda")
    weight = torch.rand(hidden, device="cuda").bfloat16() + 0.5
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5), **BF16_TOL)
    normed, summed = fused_add_rms_norm(x, residual, weight, 1e-5)
    want_normed, want_summed = fused_add_rms_norm_reference(x, residual, weight, 1e-5)
    torch.testing.assert_close(summed, want_summed, **BF16_TOL)
    torch.testing.assert_close(normed, want_normed, **BF16_TOL)


def test_rotary_bf16() -> None:
    from services.llm.kernels.rotary import apply_rotary

    cache = build_cos_sin_cache(128, 8192, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192}, device="cuda")
    qkv = torch.randn(300, 48, 128, dtype=torch.bfloat16, device="cuda")
    positions = torch.randint(0, 8192, (300,), device="cuda")
    q, k = qkv[:, :32].clone(), qkv[:, 32:40].clone()
    apply_rotary(qkv[:, :32], qkv[:, 32:40], positions, cache)
    apply_rotary_reference(q, k, positions, cache)
    torch.testing.assert_close(qkv[:, :32], q, **BF16_TOL)
    torch.testing.assert_close(qkv[:, 32:40], k, **BF16_TOL)


def test_silu_and_mul_bf16() -> None:
    from services.llm.kernels.activation import silu_and_mul

    x = torch.randn(300, 2 * 14336, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_reference(x), **BF16_TOL)


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("fmt", ["int8", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_weight_only_gemms_bf16(fmt: str, rows: int) -> None:
    """Llama-3-8B's down projection (14336 -> 4096): the Triton kernel against the same weights widened to fp32."""
    import gguf
    import numpy as np

    from services.llm.kernels.gguf_matmul import FORMATS, dequantize, gguf_matmul, unpack_rows
    from services.llm.kernels.int8_matmul import int8_matmul, quantize_int8_per_channel
    from tests.unit.llm.gguf_files import random_k_quant_rows

    out_features, in_features = 4096, 14336
    weights = torch.randn(out_features, in_features) * 0.02
    x = torch.randn(rows, in_features).bfloat16().cuda()
    if fmt == "int8":
        q, scale = quantize_int8_per_channel(weights)
        got = int8_matmul(x, q.cuda(), scale.bfloat16().cuda())
        widened = q.float() * scale.bfloat16().float()[:, None]
    else:
        raw = (random_k_quant_rows(fmt, out_features, in_features, np.random.default_rng(rows)) if fmt.endswith("_K")
               else gguf.quants.quantize(weights.numpy(), gguf.GGMLQuantizationType[fmt]))
        q, scale, minimum = unpack_rows(fmt, raw)
        got = gguf_matmul(x, FORMATS[fmt], q.cuda(), scale.cuda(), None if minimum is None else minimum.cuda())
        widened = dequantize(FORMATS[fmt], q, scale, minimum).bfloat16().float()
    want = x.float() @ widened.cuda().T
    torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item(), rtol=2e-2)
