"""SiLU(gate) * up for the gated MLP; the input holds gate and up side by side: `[T, 2 * I]`.

Triton kernel in `activation_triton.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.llm.kernels.dispatch import use_triton


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from services.llm.kernels import activation_triton

        return activation_triton.silu_and_mul_triton(x)
    return silu_and_mul_reference(x)
