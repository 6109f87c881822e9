"""A linear layer with fp8 e4m3 weights (per output channel), the loader's `fp8` weight format."""

from __future__ import annotations

import torch
from torch import nn

from services.llm.kernels.fp8_matmul import fp8_matmul, quantize_fp8_per_channel


class Fp8Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w8, scale = quantize_fp8_per_channel(linear.weight.data)
        dtype = linear.weight.dtype
        self.qweight = nn.Parameter(w8, requires_grad=False)
        self.scale = nn.Parameter(scale.to(dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_matmul(x, self.qweight, self.scale)
        return out if self.bias is None else out + self.bias


def quantize_linears_fp8(model: nn.Module) -> int:
    """Swaps every decoder layer's projections for `Fp8Linear` (embeddings and the LM head stay as they are, as
    for int8). Returns the bytes saved."""
    saved = 0
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, child in list(owner.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(owner, name, Fp8Linear(child))
                    saved += child.weight.numel() * (child.weight.element_size() - 1)
    return saved
