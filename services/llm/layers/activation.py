"""The gated MLP activation: SiLU(gate) * up over a fused gate_up projection."""

from __future__ import annotations

import torch
from torch import nn

from services.llm.kernels import activation, cpu_compiled


class SiluAndMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.compiled_cpu = False  # prefill-sized CPU steps take `cpu_compiled` (set by the engine)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.compiled_cpu and cpu_compiled.applies(gate_up):
            return cpu_compiled.silu_and_mul(gate_up)
        return activation.silu_and_mul(gate_up)
