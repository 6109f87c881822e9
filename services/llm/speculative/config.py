"""What speculation is on, and how many draft tokens a sequence gets in a step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.llm.engine.sequence import Sequence

METHODS = ("off", "ngram", "draft")


@dataclass(slots=True)
class SpeculativeConfig:
    method: str = "off"  # "ngram": prompt lookup; "draft": a smaller model with the same tokenizer
    num_tokens: int = 4  # most draft tokens per sequence per step
    ngram_min: int = 2  # prompt lookup matches the last n tokens, n from ngram_max down to ngram_min
    ngram_max: int = 4
    draft_model: str = ""  # the draft model's directory or .gguf ("draft" only)
    max_batch: int = 0  # no drafts while more than this many sequences run (0: no limit)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        if self.num_tokens < 1:
            raise ValueError(f"speculative num_tokens must be >= 1, got {self.num_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min ({self.ngram_min}) <= ngram_max ({self.ngram_max})")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("speculative method 'draft' needs a draft model")
        if self.max_batch < 0:
            raise ValueError(f"speculative max_batch must be >= 0, got {self.max_batch}")

    @property
    def enabled(self) -> bool:
        return self.method != "off"


def speculation_slots(config: SpeculativeConfig, seq: Sequence, num_running: int) -> int:
    """Draft tokens the scheduler reserves room for behind a decoding sequence's next token. None for requests
    with penalties (each row's logits would depend on the drafts before it), and never more than the tokens the
    request still wants (accepted drafts are output tokens; a bonus token past max_tokens is dropped)."""
    if not config.enabled or (config.max_batch and num_running > config.max_batch) or seq.params.uses_penalties:
        return 0
    return max(0, min(config.num_tokens, seq.params.max_tokens - seq.num_output_tokens))
