"""Matmuls on GGUF block-quantized weights, kept in llama.cpp's block layout: `x @ W.T` with W `[out, in]`.

Each row of W is a run of blocks of 32 weights along `in`, each with an fp16 scale `d` (and for Q4_1 an fp16
minimum `m`): Q8_0 holds int8 `q` (`w = d*q`), Q4_0 4-bit `q` (`w = d*(q-8)`), Q4_1 4-bit `q` (`w = d*q + m`).
A 4-bit block packs weight j and weight j+16 into the low and high nibble of its byte j. Q4_K (super-blocks of
256 4-bit weights: fp16 `d` and `dmin`, eight 6-bit scales and mins) runs as Q4_1: at load each 32-weight
sub-block gets its fp32 scale `d*sc` and minimum `-(dmin*m)` (8 bytes per 32 weights: 0.75 bytes per weight
instead of the file's 0.5625) and its nibbles are regrouped into Q4_1's order; the 4-bit values are unchanged.
Q6_K (super-blocks of 256 6-bit weights, an int8 scale per 16 and an fp16 `d`) runs as Q8_0 with groups of 16:
each weight's `q - 32` as int8 and each group's fp32 scale `d*sc` (1.25 bytes per weight instead of 0.82).
The weights are dequantized in fp32 exactly as the GGUF reader (`gguf.quants`) dequantizes them at load, then
rounded to the activations' dtype: both paths multiply the same weights.

The reference widens the whole matrix for every matmul (the CPU path and the test oracle); CUDA tensors go to
the Triton kernel in `quantized_matmul_triton.py`, which widens one tile at a time in registers.
"""

from __future__ import annotations

import numpy as np
import torch

from services.llm.kernels.dispatch import use_triton

BLOCK = 32
FORMATS = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 2, "Q6_K": 0}  # GGML type name -> the kernels' FORMAT
_BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 4 + 16}


def unpack_rows(fmt: str, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Splits GGUF rows `[out, blocks * bytes_per_block]` (uint8) into the block arrays the kernels read:
    `q` (int8 `[out, in]` for Q8_0, packed uint8 `[out, in/2]` for Q4), `scale` and `minimum` (fp16
    `[out, in/32]`, fp32 for Q4_K, `[out, in/16]` fp32 for Q6_K; `minimum` only for Q4_1 and Q4_K)."""
    if fmt == "Q4_K":
        return _unpack_q4_k(raw)
    if fmt == "Q6_K":
        return _unpack_q6_k(raw)
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, _BLOCK_BYTES[fmt])
    scale = torch.from_numpy(np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[..., 0])
    minimum = None
    if fmt == "Q4_1":
        minimum = torch.from_numpy(np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0])
    payload = np.ascontiguousarray(blocks[:, :, 4 if fmt == "Q4_1" else 2:]).reshape(rows, -1)
    q = torch.from_numpy(payload.view(np.int8) if fmt == "Q8_0" else payload)
    return q, scale, minimum


def _unpack_q4_k(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from gguf.quants import Q4_K

    rows = raw.shape[0]
    blocks = raw.reshape(-1, 144)  # 256 weights: d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 of nibbles
    d = np.ascontiguousarray(blocks[:, 0:2]).view(np.float16).astype(np.float32)
    dmin = np.ascontiguousarray(blocks[:, 2:4]).view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    scale = d * sc.astype(np.float32)  # what gguf.quants computes, sub-block by sub-block
    minimum = -(dmin * m.astype(np.float32))
    nibbles = blocks[:, 16:].reshape(-1, 4, 32)  # per 64 weights: 32 bytes, low nibbles first, then high
    values = np.stack([nibbles & 0xF, nibbles >> 4], axis=2).reshape(rows, -1, 2, 16)  # weight order
    packed = values[:, :, 0] | (values[:, :, 1] << 4)  # Q4_1's: byte j = weight j, weight j+16
    return (torch.from_numpy(np.ascontiguousarray(packed).reshape(rows, -1)),
            torch.from_numpy(scale.reshape(rows, -1)), torch.from_numpy(minimum.reshape(rows, -1)))


def _unpack_q6_k(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, None]:
    rows = raw.shape[0]
    blocks = raw.reshape(-1, 210)  # 256 weights: 128 bytes of low nibbles, 64 of high bit pairs, 16 scales, d
    low = (blocks[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0xF
    high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low.reshape(-1, 8, 32) | (high.reshape(-1, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    d = np.ascontiguousarray(blocks[:, 208:210]).view(np.float16).astype(np.float32)
    scale = d * np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).astype(np.float32)  # as gguf.quants does
    return torch.from_numpy(q.reshape(rows, -1)), torch.from_numpy(scale.reshape(rows, -1)), None


def in_features(q: torch.Tensor) -> int:
    """Input features of a block-format weight: one int8 per weight, or two 4-bit weights per byte."""
    return q.shape[1] * (1 if q.dtype == torch.int8 else 2)


def dequantize(fmt: int, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
    """The fp32 weights `[out, in]`, computed as `gguf.quants` computes them."""
    rows, blocks = scale.shape
    d = scale.float()[:, :, None]
    if fmt == FORMATS["Q8_0"]:  # groups of 32 (Q8_0) or 16 (Q6_K)
        return (d * q.view(rows, blocks, -1).float()).view(rows, -1)
    packed = q.view(rows, blocks, BLOCK // 2)
    nibbles = torch.cat([packed & 0xF, packed >> 4], dim=-1).float()  # weights 0-15, then 16-31
    if fmt == FORMATS["Q4_0"]:
        return (d * (nibbles - 8)).view(rows, -1)
    assert minimum is not None
    return (d * nibbles + minimum.float()[:, :, None]).view(rows, -1)


def gguf_matmul_reference(x: torch.Tensor, fmt: int, q: torch.Tensor, scale: torch.Tensor,
                          minimum: torch.Tensor | None) -> torch.Tensor:
    return x @ dequantize(fmt, q, scale, minimum).to(x.dtype).T


def gguf_matmul(x: torch.Tensor, fmt: int, q: torch.Tensor, scale: torch.Tensor,
                minimum: torch.Tensor | None) -> torch.Tensor:
    if use_triton(x):
        from services.llm.kernels.quantized_matmul_triton import gguf_matmul_triton

        return gguf_matmul_triton(x, fmt, q, scale, minimum)
    return gguf_matmul_reference(x, fmt, q, scale, minimum)
