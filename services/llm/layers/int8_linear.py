"""Linear layers with weight-only quantized weights (one scale per output channel): the loader's `int8` weight
format here, and the shared shape of such layers that `fp8_linear.py` reuses."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from services.llm.kernels.int8_matmul import int8_matmul, quantize_int8_per_channel


class WeightOnlyLinear(nn.Module):
    """A projection whose weights are quantized per output channel at construction. Subclasses name the
    quantizer ((weight, input Hessian or None) -> (qweight, scale)) and the matmul (x, qweight, scale -> x @ W.T).
    With `hessian`, the quantizer rounds by GPTQ (`services/llm/gptq.py`) instead of to nearest."""

    quantize: Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
    matmul: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def __init__(self, linear: nn.Linear, hessian: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = type(self).quantize(linear.weight.data, hessian)
        self.qweight = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale.to(linear.weight.dtype), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data, requires_grad=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = type(self).matmul(x, self.qweight, self.scale)
        return out if self.bias is None else out + self.bias


class Int8Linear(WeightOnlyLinear):
    quantize = staticmethod(quantize_int8_per_channel)
    matmul = staticmethod(int8_matmul)


def decoder_projections(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(owner, name, linear) for every decoder layer's projection: what the weight formats quantize (embeddings
    and the LM head stay as they are: a small share of the weights and the most sensitive to rounding)."""
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, child in list(owner.named_children()):
                if isinstance(child, nn.Linear):
                    yield owner, name, child


def quantize_projections(model: nn.Module, layer_type: type[WeightOnlyLinear],
                         hessians: dict[nn.Linear, torch.Tensor] | None = None) -> int:
    """Swaps every decoder projection for `layer_type`, GPTQ-rounded where `hessians` has its input Hessian.
    Returns the bytes saved (both formats store one byte per weight)."""
    saved = 0
    for owner, name, linear in list(decoder_projections(model)):
        setattr(owner, name, layer_type(linear, (hessians or {}).get(linear)))
        saved += linear.weight.numel() * (linear.weight.element_size() - 1)
    return saved


def quantize_linears_int8(model: nn.Module) -> int:
    return quantize_projections(model, Int8Linear)
