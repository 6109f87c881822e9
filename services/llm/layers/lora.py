"""LoRA adapters on the linear layers, many at once: each token of a step uses its own request's adapter, or none.

Every loaded adapter has a slot in each wrapped layer: `lora_a` `[slots, R, in]` and `lora_b` `[slots, R, out]`
(B transposed, with the adapter's scaling folded in). A fused projection (q/k/v, gate/up) keeps one low-rank
pair per part: its rank rows are stacked, part after part, and B is block-diagonal, so it is one LoRA product
like any other layer's.

A step's LoRA work is two dense matmuls whatever the mix of adapters (a gathered, batched LoRA matmul): the
slots present in the step are gathered side by side, `h = x @ A_g.T` gives every token its rank activations
under each of them, a 0/1 mask keeps only the token's own adapter's columns, and `h @ B_g` adds the update.
Tokens of the base model get exact zeros, so their output is the base layer's, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from services.llm.layers.fp8_linear import Fp8Linear
from services.llm.layers.gguf_linear import GGUFConcatLinear, GGUFLinear
from services.llm.layers.int8_linear import Int8Linear
from services.llm.layers.packed_linear import PackedLinear


@dataclass(slots=True)
class LoRABatch:
    """The step's adapter mapping, shared by every LoRA layer of a model; the runner sets it before each step."""
    slots: torch.Tensor | None = None  # [n] int64: the slots used in the step (None: no token uses an adapter)
    mask: torch.Tensor | None = None  # [T, n, 1]: 1 where token t uses slots[j]


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear | Int8Linear | Fp8Linear | PackedLinear | GGUFLinear | GGUFConcatLinear,
                 batch: LoRABatch, max_loras: int, max_rank: int, parts: list[int]) -> None:
        super().__init__()
        assert sum(parts) == base.out_features
        self.base, self.batch, self.parts, self.max_rank = base, batch, parts, max_rank
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else base.dtype
        device = next(base.parameters()).device
        rank_rows = len(parts) * max_rank
        self.lora_a = nn.Parameter(torch.zeros(max_loras, rank_rows, base.in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.lora_b = nn.Parameter(torch.zeros(max_loras, rank_rows, base.out_features, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        slots, mask = self.batch.slots, self.batch.mask
        if slots is None or mask is None:
            return out
        n, rank_rows = slots.shape[0], self.lora_a.shape[1]
        a = self.lora_a.index_select(0, slots).view(n * rank_rows, -1)
        b = self.lora_b.index_select(0, slots).view(n * rank_rows, -1)
        h = (x @ a.T).view(-1, n, rank_rows) * mask
        return out + h.view(-1, n * rank_rows) @ b

    @torch.no_grad()
    def set_adapter(self, slot: int, part: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """One part's low-rank pair: `a` `[r, in]`, `b` `[out_part, r]` already scaled."""
        rank = a.shape[0]
        if rank > self.max_rank:
            raise ValueError(f"adapter rank {rank} is above the server's max LoRA rank {self.max_rank}")
        if a.shape[1] != self.base.in_features or b.shape != (self.parts[part], rank):
            raise ValueError(f"adapter shapes A {tuple(a.shape)} / B {tuple(b.shape)} do not fit a layer of "
                             f"{self.base.in_features} -> {self.parts[part]} features")
        rows = slice(part * self.max_rank, part * self.max_rank + rank)
        columns = slice(sum(self.parts[:part]), sum(self.parts[:part + 1]))
        self.lora_a[slot, rows] = a.to(self.lora_a.dtype)
        self.lora_b[slot, rows, columns] = b.T.to(self.lora_b.dtype)

    @torch.no_grad()
    def clear(self, slot: int) -> None:
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()


def add_lora_layers(model: nn.Module, max_loras: int, max_rank: int) -> tuple[LoRABatch, dict[str, LoRALinear]]:
    """Wraps every decoder layer's projections (after the weights are loaded); returns the shared step mapping and
    the wrapped layers by their path, e.g. `model.layers.3.self_attn.qkv_proj`."""
    batch = LoRABatch()
    wrapped: dict[str, LoRALinear] = {}
    for index, layer in enumerate(model.model.layers):
        for owner_name, names in (("self_attn", ("qkv_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj"))):
            owner = getattr(layer, owner_name)
            for name in names:
                base = getattr(owner, name)
                parts = owner.fused_slices() if name in ("qkv_proj", "gate_up_proj") else [base.out_features]
                lora = LoRALinear(base, batch, max_loras, max_rank, parts)
                setattr(owner, name, lora)
                wrapped[f"model.layers.{index}.{owner_name}.{name}"] = lora
    return batch, wrapped
