"""A linear layer with fp8 e4m3 weights (per output channel), the loader's `fp8` weight format."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from services.llm.kernels.fp8_matmul import fp8_matmul, quantize_fp8_per_channel
from services.llm.layers.int8_linear import WeightOnlyLinear, quantize_projections


class Fp8Linear(WeightOnlyLinear):
    quantize = staticmethod(quantize_fp8_per_channel)
    matmul = staticmethod(fp8_matmul)


def quantize_linears_fp8(model: nn.Module, hessian_groups: Iterable[dict[nn.Linear, torch.Tensor]] = ()) -> int:
    """Swaps every decoder layer's projections for `Fp8Linear`, as int8 does, GPTQ-rounded where one of
    `hessian_groups` has the projection's input Hessian (`services/llm/calibration.py`). Returns the bytes saved."""
    return quantize_projections(model, Fp8Linear, hessian_groups)
