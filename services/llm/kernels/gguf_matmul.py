"""Matmuls on GGUF block-quantized weights, kept in llama.cpp's block layout: `x @ W.T` with W `[out, in]`.

Each row of W is a run of blocks of 32 weights along `in`, each with an fp16 scale `d` (and for Q4_1 an fp16
minimum `m`): Q8_0 holds int8 `q` (`w = d*q`), Q4_0 4-bit `q` (`w = d*(q-8)`), Q4_1 4-bit `q` (`w = d*q + m`).
A 4-bit block packs weight j and weight j+16 into the low and high nibble of its byte j. The weights are
dequantized in fp32 exactly as the GGUF reader (`gguf.quants`) dequantizes them at load, then rounded to the
activations' dtype: both paths multiply the same weights.

The reference widens the whole matrix for every matmul (the CPU path and the test oracle); CUDA tensors go to
the Triton kernel in `quantized_matmul_triton.py`, which widens one tile at a time in registers.
"""

from __future__ import annotations

import numpy as np
import torch

from services.llm.kernels.dispatch import use_triton

BLOCK = 32
FORMATS = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2}  # GGML type name -> the kernels' FORMAT
_BLOCK_BYTES = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 4 + 16}


def unpack_rows(fmt: str, raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Splits GGUF rows `[out, blocks * bytes_per_block]` (uint8) into the block arrays the kernels read:
    `q` (int8 `[out, in]` for Q8_0, packed uint8 `[out, in/2]` for Q4), `scale` and `minimum` (fp16
    `[out, in/32]`; `minimum` only for Q4_1)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, _BLOCK_BYTES[fmt])
    scale = torch.from_numpy(np.ascontiguousarray(blocks[:, :, 0:2]).view(np.float16)[..., 0])
    minimum = None
    if fmt == "Q4_1":
        minimum = torch.from_numpy(np.ascontiguousarray(blocks[:, :, 2:4]).view(np.float16)[..., 0])
    payload = np.ascontiguousarray(blocks[:, :, 4 if fmt == "Q4_1" else 2:]).reshape(rows, -1)
    q = torch.from_numpy(payload.view(np.int8) if fmt == "Q8_0" else payload)
    return q, scale, minimum


def dequantize(fmt: int, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None) -> torch.Tensor:
    """The fp32 weights `[out, in]`, computed as `gguf.quants` computes them."""
    rows, blocks = scale.shape
    d = scale.float()[:, :, None]
    if fmt == FORMATS["Q8_0"]:
        return (d * q.view(rows, blocks, BLOCK).float()).view(rows, -1)
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
