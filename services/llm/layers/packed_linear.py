"""A linear layer whose weight is reordered once, at load, into oneDNN's blocked layout (CPU, bf16).

`F.linear` on a plain bf16 weight has oneDNN reorder the weight into its blocked (AMX/AVX512-BF16) layout on
every call; for the small GEMMs of decode steps that reorder is about half the time (measured on an AMX Xeon:
1.5-2.5x faster packed at 1-32 rows, 1.1-1.4x at 128-512, even at 2048). The packed matmul runs the same kernel
on the same numbers: outputs are bit for bit those of `F.linear`. The layout is chosen for a batch-size hint;
512 serves 1-2048 rows about as well as each row count's own (64 was 10-20% slower than `F.linear` at 2048).
Where the engine has the AMX kernel of `kernels/matmul_cpu` (it checks the bits first), steps of up to 32 rows
run in it instead, on the same packed weight: the same outputs, faster.
"""

from __future__ import annotations

import torch
from torch import nn

from services.llm.kernels.matmul_cpu import MatmulKernel

PACKING_BATCH_HINT = 512


def cpu_packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this device and dtype get packed weights: CPU bf16 where oneDNN has native bf16 kernels."""
    return (device.type == "cpu" and dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACKING_BATCH_HINT)
        self.packed_weight = nn.Parameter(packed, requires_grad=False)
        self.packed_address = torch.ops.mkldnn.data_ptr(packed)  # for the AMX kernel: looked up once, not per call
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.cpu_kernel: MatmulKernel | None = None  # decode-sized steps' AMX kernel (set by the engine)

    @property
    def dtype(self) -> torch.dtype:
        return self.packed_weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        if self.cpu_kernel is not None and self.cpu_kernel.applies(rows):
            out = self.cpu_kernel(rows, self.packed_address, self.bias, self.out_features)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_weight, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Swaps every `nn.Linear` of the model (projections and the LM head) for a `PackedLinear`. A tied LM head
    gets its own packed copy (the embedding keeps the plain weight). Returns the number of layers packed."""
    swaps = [(owner, name, child) for owner in model.modules() for name, child in owner.named_children()
             if isinstance(child, nn.Linear)]
    for owner, name, child in swaps:
        setattr(owner, name, PackedLinear(child))
    return len(swaps)

