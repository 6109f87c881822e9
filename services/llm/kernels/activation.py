"""SiLU(gate) * up for the gated MLP; the input holds gate and up side by side: `[T, 2 * I]`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return silu_and_mul_reference(x)
