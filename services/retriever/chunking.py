"""Split text into chunks measured in tokens of the embedding model's tokenizer.

A chunk never holds more tokens than the embedding model reads (its limit minus [CLS]/[SEP]), or the
embedder would silently cut it; a size capped so shrinks the overlap in the same ratio. Cuts fall on sentence
boundaries where one is near, else on word boundaries.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

_SENTENCE_END = re.compile(r"[.!?;:]['\")\]]*\s+|\n+")
SPECIAL_TOKENS = 2  # [CLS] and [SEP] take two positions of the model's input


@dataclass(slots=True, frozen=True)
class TextChunk:
    text: str
    start: int  # character offsets into the chunked text
    end: int
    tokens: int


class Chunker:
    """Token-aware chunking; `max_tokens` is the most content tokens a chunk may hold."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int) -> None:
        assert max_tokens > 0
        self.tokenizer = tokenizer
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.max_tokens = max_tokens

    @classmethod
    def from_model_dir(cls, model_dir: Path, model_max_tokens: int = 0) -> Chunker:
        """Load `tokenizer.json` from a model directory; the input limit comes from its configs if not given."""
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        limit = model_max_tokens or _model_input_limit(model_dir)
        return cls(tokenizer, limit - SPECIAL_TOKENS)

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def effective_size(self, size: int) -> int:
        return max(1, min(size, self.max_tokens))

    def effective_overlap(self, size: int, overlap: int) -> int:
        """`overlap` scaled by the cap on `size` (512/128 on a 254-token model: 63), and at most half a chunk."""
        effective = self.effective_size(size)
        if size > effective:  # keep the asked ratio: a full overlap would make capped neighbours share half their text
            overlap = overlap * effective // size
        return max(0, min(overlap, effective // 2))

    def chunk(self, text: str, size: int, overlap: int) -> list[TextChunk]:
        """Chunks of at most `effective_size(size)` tokens; neighbours share at most `effective_overlap` tokens."""
        size, overlap = self.effective_size(size), self.effective_overlap(size, overlap)
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        offsets, word_ids = encoding.offsets, encoding.word_ids
        n = len(offsets)
        if n == 0:
            return []
        # A token may start a chunk only if it starts a word, so re-tokenising the chunk text gives the same tokens.
        word_start = [i == 0 or word_ids[i] != word_ids[i - 1] or word_ids[i] is None for i in range(n)]
        sentence_starts = {m.end() for m in _SENTENCE_END.finditer(text)}
        sentence_start = [word_start[i] and (i == 0 or offsets[i][0] in sentence_starts
                                             or _gap_has_newline(text, offsets[i - 1][1], offsets[i][0]))
                          for i in range(n)]
        chunks: list[TextChunk] = []
        start = 0
        while start < n:
            end = self._cut(start, size, n, word_start, sentence_start)
            chunks.append(self._make(text, offsets, start, end))
            if end >= n:
                break
            start = self._next_start(start, end, overlap, word_start, sentence_start)
        return chunks

    @staticmethod
    def _cut(start: int, size: int, n: int, word_start: list[bool], sentence_start: list[bool]) -> int:
        """End (exclusive) of the chunk starting at `start`: a sentence boundary in its second half if any."""
        limit = start + size
        if limit >= n:
            return n
        for end in range(limit, start + size // 2, -1):
            if sentence_start[end]:
                return end
        for end in range(limit, start, -1):
            if word_start[end]:
                return end
        return limit  # one word longer than the chunk: cut inside it

    @staticmethod
    def _next_start(start: int, end: int, overlap: int, word_start: list[bool], sentence_start: list[bool]) -> int:
        """Start of the next chunk: at most `overlap` tokens before `end`, on a sentence start if one is there."""
        lowest = max(end - overlap, start + 1)
        for candidate in range(lowest, end):
            if sentence_start[candidate]:
                return candidate
        for candidate in range(lowest, end):
            if word_start[candidate]:
                return candidate
        return end

    def _make(self, text: str, offsets: list[tuple[int, int]], start: int, end: int) -> TextChunk:
        char_start, char_end = offsets[start][0], offsets[end - 1][1]
        return TextChunk(text[char_start:char_end], char_start, char_end, end - start)


def _gap_has_newline(text: str, left: int, right: int) -> bool:
    return "\n" in text[left:right]


def _model_input_limit(model_dir: Path) -> int:
    """sentence-transformers' max_seq_length if present (what the embedder truncates to), else the tokenizer's."""
    for name, key in (("sentence_bert_config.json", "max_seq_length"), ("tokenizer_config.json", "model_max_length"),
                      ("config.json", "max_position_embeddings")):
        path = model_dir / name
        if path.exists():
            value = json.loads(path.read_text()).get(key)
            if isinstance(value, int) and 0 < value < 1_000_000:
                return value
    return 512
