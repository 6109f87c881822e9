"""Rotary position embedding with its cos/sin table precomputed for every position.

The table lives on the device the model is built on (the default device, `with device:` in the loader) and
stays fp32 whatever the model's dtype: the kernels read it in fp32, as Hugging Face computes it.
"""

from __future__ import annotations

import torch
from torch import nn

from services.llm.kernels import cpu_compiled, rotary
from services.llm.kernels.elementwise_cpu import ElementwiseKernel


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None) -> None:
        super().__init__()
        cache = rotary.build_cos_sin_cache(head_dim, max_position, base, scaling, dtype=torch.float32,
                                           device=torch.get_default_device())
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.compiled_cpu = False  # prefill-sized CPU steps take `cpu_compiled` (set by the engine)
        self.cpu_kernel: ElementwiseKernel | None = None  # the other CPU steps' C kernel (set by the engine)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotates q `[T, Hq, D]` and k `[T, Hkv, D]` in place."""
        if self.compiled_cpu and cpu_compiled.applies(q):
            cpu_compiled.apply_rotary(q, k, positions, self.cos_sin_cache)
        elif self.cpu_kernel is not None:
            self.cpu_kernel.apply_rotary(q, k, positions, self.cos_sin_cache)
        else:
            rotary.apply_rotary(q, k, positions, self.cos_sin_cache)
