"""Triton SiLU(gate) * up (see `activation.py`). Programs tile each row of the intermediate dimension."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.llm.kernels.launches import launch


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, intermediate, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    intermediate = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], intermediate, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = min(block, triton.next_power_of_2(intermediate))
        launch(_silu_and_mul_kernel, (rows.shape[0], triton.cdiv(intermediate, block)),
               rows, out, rows.stride(0), out.stride(0), intermediate, BLOCK=block)
    return out.view(*x.shape[:-1], intermediate)
