"""Prompt lookup: the next tokens are guessed by finding the sequence's last n tokens earlier in it.

RAG answers copy spans of their sources, so the continuation of an earlier occurrence is often right.
No model runs; the longest n that matches wins, and its latest occurrence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

if TYPE_CHECKING:
    from services.llm.engine.sequence import Sequence


class NgramProposer:
    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        assert 1 <= ngram_min <= ngram_max
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, seqs: list[Sequence], num_slots: list[int]) -> list[list[int]]:
        return [lookup(seq.token_ids, self.ngram_min, self.ngram_max, slots) if slots else []
                for seq, slots in zip(seqs, num_slots, strict=True)]


def lookup(tokens: list[int], ngram_min: int, ngram_max: int, count: int) -> list[int]:
    """Up to `count` tokens that followed the latest earlier occurrence of the longest matching suffix."""
    if len(tokens) <= ngram_min:
        return []
    history = np.asarray(tokens, dtype=np.int64)
    for n in range(min(ngram_max, len(tokens) - 1), ngram_min - 1, -1):
        # Windows that end before the last token, so at least one token follows each.
        windows = sliding_window_view(history[:-1], n)
        hits = np.flatnonzero((windows == history[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + count]
    return []
