"""Rotary position embedding with its cos/sin table precomputed for every position."""

from __future__ import annotations

import torch
from torch import nn

from services.llm.kernels import rotary


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None) -> None:
        super().__init__()
        cache = rotary.build_cos_sin_cache(head_dim, max_position, base, scaling)
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        """Rotates q `[T, Hq, D]` and k `[T, Hkv, D]` in place."""
        rotary.apply_rotary(q, k, positions, self.cos_sin_cache)
