"""Triton weight-only GEMMs: `x @ W.T` with W kept quantized in memory and widened in registers, tile by tile.

Two kernels, one tiling: `[rows, in]` activations (fp16/bf16/fp32) times `[out, in]` weights, fp32 accumulation.
- `_int8_matmul_kernel`: per-output-channel int8 (`int8_matmul.py`); int8 values are exact in the activations'
  dtype, so the dot takes them widened as they are and the channel scale is applied once, in the epilogue.
- `_gguf_matmul_kernel`: llama.cpp blocks of 32 weights along `in` with an fp16 scale each (`gguf_matmul.py`):
  Q8_0 (int8, `w = d*q`; Q6_K runs here too, in groups of 16 with fp32 scales), Q4_0 (4-bit, `w = d*(q-8)`),
  Q4_1 (4-bit, `w = d*q + m`; and Q4_K, with fp32 scales). A tile's weights are dequantized in fp32, the way
  the GGUF reader dequantizes them at load, and rounded to the activations' dtype before the dot: the same
  weights the dequantize-at-load path multiplies. A Q4 block stores element j and element j+16 in the low and
  high nibble of byte j, so a tile is two dots, one over the low nibbles with the activations of columns j, one
  over the high nibbles with the columns j+16; nothing is interleaved. The kernel is compiled without fp
  contraction: Q4_1's `d*q + m` rounds the product and then the sum, as numpy does, instead of one fused
  multiply-add, so the weights are those of the reader to the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.llm.kernels.launches import launch


@triton.jit
def _int8_matmul_kernel(
    x_ptr, q_ptr, scale_ptr, out_ptr,
    rows, out_features, in_features, stride_x, stride_o,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rm < rows, rn < out_features
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_x
    q_cols = q_ptr + rn.to(tl.int64)[None, :] * in_features
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & (k < in_features)[None, :], other=0.0)
        q = tl.load(q_cols + k[:, None], mask=(k < in_features)[:, None] & col_ok[None, :], other=0)
        acc = tl.dot(x, q.to(x.dtype), acc, input_precision=DOT_PRECISION)
    scale = tl.load(scale_ptr + rn, mask=col_ok, other=0.0).to(tl.float32)
    out = acc * scale[None, :]
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_o + rn[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gguf_matmul_kernel(
    x_ptr, q_ptr, scale_ptr, min_ptr, out_ptr,
    rows, out_features, in_features, stride_x, stride_o,
    FORMAT: tl.constexpr, GROUP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rm < rows, rn < out_features
    blocks_per_row = in_features // GROUP  # scales per row: a scale per GROUP weights (32; 16 for Q6_K)
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_x
    scale_cols = scale_ptr + rn.to(tl.int64)[None, :] * blocks_per_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FORMAT == 0:  # Q8_0 (and Q6_K): one int8 per weight
        rk = tl.arange(0, BLOCK_K)
        q_cols = q_ptr + rn.to(tl.int64)[None, :] * in_features
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + rk
            k_ok = k < in_features
            x = tl.load(x_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            q = tl.load(q_cols + k[:, None], mask=w_mask, other=0).to(tl.float32)
            d = tl.load(scale_cols + (k // GROUP)[:, None], mask=w_mask, other=0.0).to(tl.float32)
            acc = tl.dot(x, (d * q).to(x.dtype), acc, input_precision=DOT_PRECISION)
    else:  # Q4_0 / Q4_1: byte j of a block holds weights j (low nibble) and j+16 (high nibble)
        rp = tl.arange(0, BLOCK_K // 2)
        q_cols = q_ptr + rn.to(tl.int64)[None, :] * (in_features // 2)
        for k0 in range(0, in_features, BLOCK_K):
            block = k0 // 32 + rp // 16
            block_ok = block < blocks_per_row
            k_low = block * 32 + rp % 16
            w_mask = block_ok[:, None] & col_ok[None, :]
            x_mask = row_ok[:, None] & block_ok[None, :]
            x_low = tl.load(x_rows + k_low[None, :], mask=x_mask, other=0.0)
            x_high = tl.load(x_rows + (k_low + 16)[None, :], mask=x_mask, other=0.0)
            packed = tl.load(q_cols + (k0 // 2 + rp)[:, None], mask=w_mask, other=0)
            low, high = (packed & 0xF).to(tl.float32), (packed >> 4).to(tl.float32)
            d = tl.load(scale_cols + block[:, None], mask=w_mask, other=0.0).to(tl.float32)
            if FORMAT == 1:
                w_low, w_high = d * (low - 8.0), d * (high - 8.0)
            else:
                m = tl.load(min_ptr + rn.to(tl.int64)[None, :] * blocks_per_row + block[:, None], mask=w_mask,
                            other=0.0).to(tl.float32)
                w_low, w_high = d * low + m, d * high + m
            acc = tl.dot(x_low, w_low.to(x_low.dtype), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(x_high, w_high.to(x_high.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + rm.to(tl.int64)[:, None] * stride_o + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def tiles(rows: int, narrow: bool = False) -> dict[str, int]:
    """Tile sizes and launch options by the number of activation rows: decode steps read every weight once and
    are bound by memory (narrow tiles, many programs, deep pipelining); prefill chunks are bound by the dots.
    `narrow` (4-bit weights, or the K-quants' fp32 scales) halves the prefill tile's width: two dots and their
    gathered scales spilled on sm_80/89 at 128x128, and Q6_K's fp32 scale tiles took 112 KiB of shared memory,
    above sm_89's 99."""
    if rows <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if rows <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64 if narrow else 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"  # fp32 stays fp32; tf32 is ignored for 16-bit inputs


def int8_matmul_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    x2 = _rows(x)
    out_features, in_features = q.shape
    out = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        t = tiles(x2.shape[0])
        grid = (triton.cdiv(x2.shape[0], t["BLOCK_M"]), triton.cdiv(out_features, t["BLOCK_N"]))
        launch(_int8_matmul_kernel, grid, x2, q, scale, out, x2.shape[0], out_features, in_features,
               x2.stride(0), out.stride(0), DOT_PRECISION=_precision(x), **t)
    return out.view(*x.shape[:-1], out_features)


def gguf_matmul_triton(x: torch.Tensor, fmt: int, q: torch.Tensor, scale: torch.Tensor,
                       minimum: torch.Tensor | None) -> torch.Tensor:
    x2 = _rows(x)
    out_features, in_features = scale.shape[0], q.shape[1] * (1 if fmt == 0 else 2)
    group = in_features // scale.shape[1]
    assert fmt == 0 or group == 32, "4-bit formats come in blocks of 32"
    out = torch.empty(x2.shape[0], out_features, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        t = tiles(x2.shape[0], narrow=fmt != 0 or scale.dtype == torch.float32)
        grid = (triton.cdiv(x2.shape[0], t["BLOCK_M"]), triton.cdiv(out_features, t["BLOCK_N"]))
        launch(_gguf_matmul_kernel, grid, x2, q, scale, scale if minimum is None else minimum, out, x2.shape[0],
               out_features, in_features, x2.stride(0), out.stride(0), FORMAT=fmt, GROUP=group,
               DOT_PRECISION=_precision(x), enable_fp_fusion=False, **t)
    return out.view(*x.shape[:-1], out_features)
