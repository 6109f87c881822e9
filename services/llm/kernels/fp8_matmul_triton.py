"""Triton GEMM of bf16 / fp16 / fp32 activations with fp8 e4m3 weights and per-output-channel scales (see
`fp8_matmul.py` for the reference). Needs sm_89+ (Ada, Hopper): Triton lowers e4m3 only there.

One program computes a `[BLOCK_M, BLOCK_N]` tile of `x @ w.T`, walking K in `BLOCK_K` steps: the fp8 weight
tile is loaded as bytes and widened to the activations' dtype in registers, so the weights cross memory at one
byte per element, and the tensor cores multiply in the activations' dtype with fp32 accumulation. The
channel scales multiply the fp32 accumulator once, before the single rounding to the output dtype. Tiles:
decode-sized steps (a few rows) take thin row tiles and long K steps, since the weights are the whole cost;
prefill takes square tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.llm.kernels.launches import launch


@triton.jit
def _fp8_matmul_kernel(
    x_ptr, w_ptr, scale_ptr, out_ptr,
    num_rows, out_features, in_features,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # Output-column tiles are the fast axis: the programs that share a row tile of x run side by side.
    col_tile = tl.program_id(0)
    row_tile = tl.program_id(1)
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_rows
    col_ok = cols < out_features
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + ks[None, :]
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, in_features, BLOCK_K):
        k_ok = (k + ks) < in_features
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = acc * scale[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def tile_config(num_rows: int, element_size: int) -> dict[str, int]:
    """Tile and launch settings for `num_rows` rows of activations of `element_size` bytes. Shared memory per
    stage is `BLOCK_M * BLOCK_K * element_size + BLOCK_N * BLOCK_K` bytes; every choice stays under 64 KiB in
    all, well inside sm_89's 99 KiB per block."""
    if num_rows <= 16:
        config = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    elif num_rows <= 64:
        config = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
    else:
        config = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    stage = config["BLOCK_M"] * config["BLOCK_K"] * element_size + config["BLOCK_N"] * config["BLOCK_K"]
    config["num_stages"] = max(1, min(config["num_stages"], 64 * 1024 // stage))
    return config


def fp8_matmul_triton(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, **overrides: int) -> torch.Tensor:
    """`x` `[..., K]` → `[..., N]` for fp8 weights `w` `[N, K]` and scales `[N]`. `overrides` replace the tile
    settings (tests use small tiles)."""
    out_features, in_features = w.shape
    assert x.shape[-1] == in_features and w.stride(1) == 1 and scale.shape == (out_features,)
    rows = x.reshape(-1, in_features)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    num_rows = rows.shape[0]
    out = torch.empty(num_rows, out_features, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return out.reshape(*x.shape[:-1], out_features)
    config = tile_config(num_rows, x.element_size()) | overrides
    grid = (triton.cdiv(out_features, config["BLOCK_N"]), triton.cdiv(num_rows, config["BLOCK_M"]))
    launch(
        _fp8_matmul_kernel, grid,
        rows, w, scale, out,
        num_rows, out_features, in_features,
        rows.stride(0), w.stride(0), out.stride(0),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", **config,
    )
    return out.reshape(*x.shape[:-1], out_features)
