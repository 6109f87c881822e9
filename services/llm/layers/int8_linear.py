"""Linear layers with weight-only quantized weights (one scale per output channel): the loader's `int8` weight
format here, and the shared shape of such layers that `fp8_linear.py` reuses."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

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
                         hessian_groups: Iterable[dict[nn.Linear, torch.Tensor]] = ()) -> int:
    """Swaps every decoder projection for `layer_type`, GPTQ-rounded where one of `hessian_groups` has its input
    Hessian. The groups may come one at a time from a generator that runs the model (`calibration.
    projection_hessian_groups`): each group's projections are rounded and its Hessians dropped before the next
    group is asked for, and nothing is swapped until the last, so the generator always runs the unquantized model.
    Returns the bytes saved (both formats store one byte per weight)."""
    projections = list(decoder_projections(model))
    rounded: dict[nn.Linear, WeightOnlyLinear] = {}
    for hessians in hessian_groups:
        rounded.update((linear, layer_type(linear, hessian)) for linear, hessian in hessians.items())
        del hessians  # before the generator computes the next group
    saved = 0
    for owner, name, linear in projections:
        layer = rounded.pop(linear, None)
        setattr(owner, name, layer if layer is not None else layer_type(linear))
        saved += linear.weight.numel() * (linear.weight.element_size() - 1)
    return saved


def quantize_linears_int8(model: nn.Module) -> int:
    return quantize_projections(model, Int8Linear)
