"""Weight-only int8 matmul: `x @ (q * scale[:, None]).T`, with int8 weights `q` [out, in] and one scale per
output channel.

The per-channel scale factors out of the sum, so the reference multiplies after the GEMM on weights widened to
the activations' dtype. On CPU, small batches of bf16/fp16 rows (decode steps) go to PyTorch's
`_weight_int8pack_mm`, which reads the int8 weights directly: half the bytes of bf16 weights, and decode is
bound by reading weights (measured 1.8x faster than a bf16 GEMM at 1-8 rows on an AMX Xeon). Larger steps
(prefill) and fp32 activations take the reference, where the bf16 GEMM's AMX tiles win over the int8 kernel.
On CUDA the Triton kernel in `quantized_matmul_triton.py` reads the int8 weights and widens them in registers.
"""

from __future__ import annotations

import torch

from services.llm.gptq import gptq_round
from services.llm.kernels.dispatch import use_triton

INT8PACK_MAX_ROWS = 16  # above this many rows the widened bf16 GEMM is faster than the int8 kernel on CPU


def int8_matmul_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x @ q.T.to(x.dtype)) * scale


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from services.llm.kernels.quantized_matmul_triton import int8_matmul_triton

        return int8_matmul_triton(x, q, scale)
    rows = x.reshape(-1, x.shape[-1])
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and rows.shape[0] <= INT8PACK_MAX_ROWS:
        out = torch._weight_int8pack_mm(rows.contiguous(), q, scale)
        return out.reshape(*x.shape[:-1], q.shape[0])
    return int8_matmul_reference(x, q, scale)


def round_to_int8(scaled: torch.Tensor) -> torch.Tensor:
    return torch.round(scaled).clamp(-127, 127)


def quantize_int8_per_channel(weight: torch.Tensor,
                              hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q, scale) with weight ~= q * scale[:, None]; rounded to nearest,
    or with `hessian` by GPTQ on the same grid (as `quantize_fp8_per_channel`)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    scaled = w / scale[:, None]
    rounded = round_to_int8(scaled) if hessian is None else gptq_round(scaled, hessian, round_to_int8)
    return rounded.to(torch.int8), scale
