"""A request and its sequences (one per `n`), with the state the scheduler and block manager keep on them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from services.llm.engine.outputs import FinishReason, RequestTimings, TokenLogprob
from services.llm.engine.sampling_params import SamplingParams
from services.llm.guided import GrammarState

if TYPE_CHECKING:
    from services.llm.lora_adapters import LoRAAdapter


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    generator: torch.Generator | None  # per-sequence RNG when the request is seeded
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose keys and values are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chain hashes of the full blocks, as far as computed
    num_cached_blocks: int = 0  # leading blocks of block_table already published to the prefix cache
    num_draft_computed: int = 0  # speculation with a draft model: tokens whose draft KV is in the same blocks
    num_returned_tokens: int = 0  # generated tokens already handed out in a RequestOutput
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    grammar: GrammarState | None = None  # guided decoding: where this sequence is in its grammar

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    timings: RequestTimings
    seqs: list[Sequence] = field(default_factory=list)
    held_back: list[Sequence] = field(default_factory=list)  # n > 1: siblings wait for the first one's prompt
    num_cached_tokens: int = 0
    lora: LoRAAdapter | None = None  # the adapter the request generates with; None: the base model

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)

    @property
    def cache_salt(self) -> bytes | None:
        """Seeds the prefix cache's block hashes: KV computed under an adapter is reused only under it."""
        return self.lora.cache_salt if self.lora is not None else None
