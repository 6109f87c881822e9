"""Per-sequence grammar state and the next-token masks of a step, computed while the model runs.

Each constrained sequence holds a `GrammarState` (an xgrammar matcher and how many of its tokens it has
accepted). Before the model's forward pass the runner calls `GuidedDecoder.start(seqs)`: when no sequence in
the step is constrained it returns None at once (nothing else happens on the hot path); otherwise a worker
thread catches each matcher up with the tokens sampled since the last step and fills that row's bitmask while
the main thread runs the model. The sampler then calls `MaskJob.apply(logits)`, which waits for the worker
and sets the disallowed tokens of the constrained rows to -inf.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import torch

from services.llm.guided.compiler import GrammarCompiler
from services.llm.guided.spec import GuidedDecoding

log = logging.getLogger(__name__)


class GuidedSequence(Protocol):
    grammar: GrammarState | None
    token_ids: list[int]
    num_prompt_tokens: int


class GrammarState:
    """Where one sequence is in its grammar."""

    __slots__ = ("broken", "matcher", "num_accepted")

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.num_accepted = 0
        self.broken = False  # a token the grammar refused: never expected; the row is left unmasked

    def accept(self, new_token_ids: Sequence[int]) -> None:
        """Moves the matcher past the tokens sampled since the last call."""
        for token in new_token_ids:
            if not self.broken and not self.matcher.accept_token(token):
                self.broken = True
                log.error("grammar refused sampled token %d after %d tokens; the rest of this answer is "
                          "unconstrained", token, self.num_accepted)
            self.num_accepted += 1

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())


class MaskJob:
    """The bitmask of one step's constrained rows, being filled on the worker thread."""

    def __init__(self, future: Future[None], bitmask: torch.Tensor, rows: list[int], vocab_size: int) -> None:
        self.future, self.bitmask, self.rows, self.vocab_size = future, bitmask, rows, vocab_size

    def apply(self, logits: torch.Tensor) -> None:
        """Sets tokens the grammar does not allow to -inf in the constrained rows of `logits` (float32)."""
        import xgrammar

        self.future.result()
        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size, indices=self.rows)


class GuidedDecoder:
    """The engine's logits processor for constrained requests: grammar states and per-step masks."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.compiler = GrammarCompiler(tokenizer, vocab_size, stop_token_ids)
        self.vocab_size = vocab_size
        self._worker: ThreadPoolExecutor | None = None

    def new_state(self, spec: GuidedDecoding) -> GrammarState:
        import xgrammar

        return GrammarState(xgrammar.GrammarMatcher(self.compiler.compile(spec)))

    def start(self, seqs: Sequence[GuidedSequence], logit_rows: Sequence[int], num_rows: int) -> MaskJob | None:
        """Starts filling the masks of the constrained ones among `seqs` (the sequences sampled this step, whose
        logits are at `logit_rows` of a `num_rows`-row logits tensor)."""
        constrained = [i for i, seq in enumerate(seqs) if seq.grammar is not None and not seq.grammar.broken]
        if not constrained:
            return None
        import xgrammar

        bitmask = xgrammar.allocate_token_bitmask(num_rows, self.vocab_size)
        work = []
        for i in constrained:
            seq = seqs[i]
            state = seq.grammar
            assert state is not None
            work.append((logit_rows[i], state, seq.token_ids[seq.num_prompt_tokens + state.num_accepted:]))
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar")
        future = self._worker.submit(_fill, work, bitmask)
        return MaskJob(future, bitmask, [logit_rows[i] for i in constrained], self.vocab_size)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False)


def _fill(work: list[tuple[int, GrammarState, list[int]]], bitmask: torch.Tensor) -> None:
    for row, state, new_token_ids in work:
        state.accept(new_token_ids)
        if not state.broken:
            state.matcher.fill_next_token_bitmask(bitmask, row)
