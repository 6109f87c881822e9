"""The gated MLP activation: SiLU(gate) * up over a fused gate_up projection."""

from __future__ import annotations

import torch
from torch import nn

from services.llm.kernels import activation, cpu_compiled
from services.llm.kernels.elementwise_cpu import ElementwiseKernel


class SiluAndMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.compiled_cpu = False  # prefill-sized CPU steps take `cpu_compiled` (set by the engine)
        self.cpu_kernel: ElementwiseKernel | None = None  # the other CPU steps' C kernel (set by the engine)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.compiled_cpu and cpu_compiled.applies(gate_up):
            return cpu_compiled.silu_and_mul(gate_up)
        if self.cpu_kernel is not None:
            return self.cpu_kernel.silu_and_mul(gate_up)
        return activation.silu_and_mul(gate_up)
