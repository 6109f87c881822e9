"""What a request asks of generation; checked once, at the door."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.llm.guided.spec import GuidedDecoding

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) means the whole vocabulary
    min_p: float = 0.0
    seed: int | None = None
    n: int = 1
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: off; k: the sampled token's logprob plus the top-k alternatives
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None  # added to the logits of these token ids, OpenAI's -100..100
    guided: GuidedDecoding | None = None  # the output must match this grammar (masked token by token)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self) -> None:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1,
             f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and (self.top_k >= -1), f"top_k must be -1 (off) or >= 0, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (isinstance(self.n, int) and self.n >= 1, f"n must be >= 1, got {self.n}"),
            (isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}"),
            (self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (all(isinstance(t, int) and t >= 0 and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS
                 for t, b in (self.logit_bias or {}).items()),
             f"logit_bias maps token ids (>= 0) to values between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}"),
            # The grammar decides where the answer ends: it allows only EOS once complete.
            (self.guided is None or not self.ignore_eos, "ignore_eos cannot be combined with guided decoding"),
            (self.guided is None or self.min_tokens == 0, "min_tokens cannot be combined with guided decoding"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
