"""What the engine hands back: per-request outputs, their timings, and engine-wide counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-k alternatives, best first (empty when logprobs=0)


@dataclass(slots=True)
class CompletionOutput:
    index: int
    token_ids: list[int]  # everything generated, once finished (empty before: copying it every step is quadratic)
    new_token_ids: list[int]  # generated since this request's previous output
    logprobs: list[TokenLogprob] | None  # for new_token_ids; None when not requested
    finish_reason: FinishReason | None
    stop_token_id: int | None  # the stop token (EOS or a stop_token_ids entry) that ended it, if any

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestTimings:
    """Wall-clock times (time.time()) from which a server derives queue time, TTFT, ITL and latency."""
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)  # one per step that produced tokens

    @property
    def last_token(self) -> float | None:
        return self.token_times[-1] if self.token_times else None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    timings: RequestTimings


@dataclass(slots=True, frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float  # fraction of KV blocks held by live sequences, 0..1
    num_free_blocks: int
    num_total_blocks: int
    prefix_cache_queries: int  # in tokens: prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # in tokens: of those, found in the cache
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    spec_draft_tokens_total: int = 0  # speculative decoding: draft tokens the target checked
    spec_accepted_tokens_total: int = 0  # ... and of those, the ones it accepted
