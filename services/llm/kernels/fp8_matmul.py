"""Weight-only fp8 matmul: `x @ (w * scale[:, None]).T`, with e4m3 weights `w` [out, in] and one scale per output
channel (the loader's `fp8` weight format).

The per-channel scale factors out of the sum, so the reference multiplies after a GEMM on the weights widened
to the activations' dtype (exact: every e4m3 value is a bf16, fp16 and fp32 value). That reference is the CPU
path: CPUs have no fp8 arithmetic, so fp8 there saves memory (half of bf16's weight bytes at rest), not time.
On CUDA the Triton kernel in `fp8_matmul_triton.py` reads the fp8 weights directly and widens them in
registers, so a decode step reads half the weight bytes of bf16.
"""

from __future__ import annotations

import torch

from services.llm.gptq import gptq_round
from services.llm.kernels.dispatch import use_triton

FP8_WEIGHT_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_WEIGHT_DTYPE).max  # 448


def fp8_matmul_reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x @ w.T.to(x.dtype)) * scale


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        from services.llm.kernels import fp8_matmul_triton

        return fp8_matmul_triton.fp8_matmul_triton(x, w, scale)
    return fp8_matmul_reference(x, w, scale)


def round_to_e4m3(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3 value (ties to even), saturating at ±448, as fp32."""
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_WEIGHT_DTYPE).float()


def quantize_fp8_per_channel(weight: torch.Tensor,
                             hessian: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel e4m3: returns (w8, scale) with weight ~= w8 * scale[:, None]; each row's largest
    magnitude maps to 448, e4m3's largest finite value. Without `hessian` each weight rounds to its nearest e4m3
    value; with one (the sum of x xᵀ over the layer's calibration inputs), GPTQ rounding on the same grid and
    scales, for a smaller output error on those inputs (e4m3's 3-bit mantissa costs a small model several percent
    perplexity rounded to nearest)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    scaled = w / scale[:, None]
    rounded = round_to_e4m3(scaled) if hessian is None else gptq_round(scaled, hessian, round_to_e4m3)
    return rounded.to(FP8_WEIGHT_DTYPE), scale
