"""Rotary position embedding (rotate-half / NeoX layout, as HF Llama and Qwen2), with llama3 scaling.

Triton kernel in `rotary_triton.py`.
"""

from __future__ import annotations

import math

import torch

from services.llm.kernels.dispatch import use_triton


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None) -> torch.Tensor:
    """On the CPU whatever the default device, so every device gets the same table."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim))
    if not scaling:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        original = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        return torch.where(medium, blended, scaled).float()
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind in (None, "default"):
        return inv_freq.float()
    raise ValueError(f"unsupported rope scaling {kind!r}")


def build_cos_sin_cache(head_dim: int, max_position: int, base: float, scaling: dict | None = None,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """`[max_position, head_dim]` on `device`: cos of the half-dim angles, then their sin. Computed on the CPU
    (the same numbers for every device), then moved."""
    inv_freq = rope_inv_freq(head_dim, base, scaling)
    angles = torch.outer(torch.arange(max_position, dtype=torch.float32, device="cpu"), inv_freq)
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype=dtype, device=device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                           cos_sin_cache: torch.Tensor) -> None:
    """In place on q `[T, Hq, D]` and k `[T, Hkv, D]`. In the model's dtype, with cos/sin rounded to it, as
    Hugging Face Llama computes it: bf16 results match it exactly (fp32 ones are unchanged)."""
    cos, sin = cos_sin_cache[positions].to(q.dtype).chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    q.copy_(_rotate(q, cos, sin))
    k.copy_(_rotate(k, cos, sin))


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    if use_triton(q):
        from services.llm.kernels import rotary_triton

        rotary_triton.apply_rotary_triton(q, k, positions, cos_sin_cache)
        return
    apply_rotary_reference(q, k, positions, cos_sin_cache)
