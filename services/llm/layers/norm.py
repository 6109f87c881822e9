"""RMSNorm as a module, with the residual add fused in when one is given."""

from __future__ import annotations

import torch
from torch import nn

from services.llm.kernels import cpu_compiled, norm
from services.llm.kernels.elementwise_cpu import ElementwiseKernel


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.compiled_cpu = False  # prefill-sized CPU steps take `cpu_compiled` (set by the engine)
        self.cpu_kernel: ElementwiseKernel | None = None  # the other CPU steps' C kernel (set by the engine)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.compiled_cpu and cpu_compiled.applies(x):
            if residual is None:
                return cpu_compiled.rms_norm(x, self.weight, self.eps)
            return cpu_compiled.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if self.cpu_kernel is not None:
            if residual is None:
                return self.cpu_kernel.rms_norm(x, self.weight, self.eps)
            return self.cpu_kernel.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return norm.rms_norm(x, self.weight, self.eps)
        return norm.fused_add_rms_norm(x, residual, self.weight, self.eps)
