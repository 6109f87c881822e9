"""The proposer interface the runner consults, and the one the configuration asks for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from services.llm.speculative.config import SpeculativeConfig

if TYPE_CHECKING:
    import torch

    from services.llm.config import ModelConfig
    from services.llm.engine.sequence import Sequence


class Proposer(Protocol):
    def propose(self, seqs: list[Sequence], num_slots: list[int]) -> list[list[int]]:
        """Up to `num_slots[i]` draft tokens to follow each sequence's tokens (fewer, or none, is fine)."""
        ...


def build_proposer(config: SpeculativeConfig, target: ModelConfig, device: torch.device, dtype: torch.dtype,
                   block_size: int, num_blocks: int) -> Proposer | None:
    if config.method == "ngram":
        from services.llm.speculative.ngram import NgramProposer

        return NgramProposer(config.ngram_min, config.ngram_max)
    if config.method == "draft":
        from services.llm.speculative.draft_model import DraftModelProposer

        return DraftModelProposer(config.draft_model, target, device, dtype, block_size, num_blocks)
    return None
