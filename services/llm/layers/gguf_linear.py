"""A linear layer whose weights stay in a GGUF block format (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), the loader's native
GGUF path."""

from __future__ import annotations

import torch
from torch import nn

from services.llm.kernels.gguf_matmul import FORMATS, dequantize, gguf_matmul, in_features


class GGUFLinear(nn.Module):
    """`q`, `scale`, `minimum` as `gguf_matmul.unpack_rows` returns them; `dtype` is the activations' dtype."""

    def __init__(self, fmt: str, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None,
                 bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        assert fmt in FORMATS and scale.dtype in (torch.float16, torch.float32) and q.shape[0] == scale.shape[0]
        self.fmt, self.format_id, self.dtype = fmt, FORMATS[fmt], dtype
        self.out_features, self.in_features = scale.shape[0], in_features(q)
        self.qweight = nn.Parameter(q, requires_grad=False)
        self.block_scale = nn.Parameter(scale, requires_grad=False)
        self.block_min = None if minimum is None else nn.Parameter(minimum, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        minimum = None if self.block_min is None else self.block_min.data
        return dequantize(self.format_id, self.qweight.data, self.block_scale.data, minimum).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        minimum = None if self.block_min is None else self.block_min
        out = gguf_matmul(x, self.format_id, self.qweight, self.block_scale, minimum)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"{self.fmt}, in_features={self.in_features}, out_features={self.out_features}"


class GGUFConcatLinear(nn.Module):
    """A fused projection (q/k/v, gate/up) whose parts come in different GGUF formats (a Q4_K_M file's Q4_K q and k
    with a Q6_K v): one `GGUFLinear` per run of same-format parts, their outputs side by side, then the bias."""

    def __init__(self, parts: list[GGUFLinear], bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        assert len({p.in_features for p in parts}) == 1 and all(p.bias is None for p in parts)
        self.parts, self.dtype = nn.ModuleList(parts), dtype
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        return torch.cat([p.dequantized_weight() for p in self.parts])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([p(x) for p in self.parts], dim=-1)
        return out if self.bias is None else out + self.bias


def block_format_counts(model: nn.Module) -> dict[str, int]:
    """How many block-format matrices the model multiplies by, per format (empty: none); a fused projection counts
    once per run of same-format parts."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, GGUFLinear):
            counts[module.fmt] = counts.get(module.fmt, 0) + 1
    return counts
