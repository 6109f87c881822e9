"""The gated MLP activation: SiLU(gate) * up over a fused gate_up projection."""

from __future__ import annotations

import torch
from torch import nn

from services.llm.kernels import activation


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return activation.silu_and_mul(gate_up)
