from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.model_files import bundled_embedding_model
from services.retriever.chunking import Chunker


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    return Chunker.from_model_dir(bundled_embedding_model())


def test_limit_is_the_model_input_minus_special_tokens(chunker: Chunker) -> None:
    # all-MiniLM-L6-v2 reads 256 tokens including [CLS] and [SEP]
    assert chunker.max_tokens == 254
    assert chunker.effective_size(512) == 254 and chunker.effective_size(100) == 100


def test_short_text_is_one_chunk_and_empty_text_none(chunker: Chunker) -> None:
    (chunk,) = chunker.chunk("One short sentence.", 512, 128)
    assert chunk.text == "One short sentence." and chunk.start == 0
    assert chunker.chunk("   ", 512, 128) == []


def test_cuts_prefer_sentence_boundaries(chunker: Chunker) -> None:
    sentences = [f"Sentence number {i} talks about the pump model X{i} in some detail." for i in range(40)]
    chunks = chunker.chunk(" ".join(sentences), 64, 16)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.text.startswith("Sentence number") and chunk.text.endswith("detail.")


words = st.text(alphabet=st.characters(codec="utf-8", categories=("L", "N", "P", "Zs")), min_size=1, max_size=12)
texts = st.lists(st.one_of(words, st.sampled_from([". ", "\n", "! ", "supercalifragilistic "])), max_size=300) \
    .map(" ".join)


@settings(max_examples=60, deadline=None)
@given(text=texts, size=st.integers(8, 600), overlap=st.integers(0, 200))
def test_chunks_fit_overlap_at_most_as_asked_and_cover_the_text(chunker: Chunker, text: str, size: int,
                                                                overlap: int) -> None:
    chunks = chunker.chunk(text, size, overlap)
    limit = chunker.effective_size(size)
    covered = [False] * len(text)
    previous_end = 0
    for chunk in chunks:
        assert chunker.count(chunk.text) <= limit
        assert text[chunk.start:chunk.end] == chunk.text
        if chunk is not chunks[0]:
            shared = chunker.count(text[chunk.start:previous_end]) if chunk.start < previous_end else 0
            assert shared <= min(overlap, limit // 2) + 1  # +1: a word split differently at the join
            assert chunk.start > chunks[chunks.index(chunk) - 1].start  # always moves forward
        previous_end = chunk.end
        for i in range(chunk.start, chunk.end):
            covered[i] = True
    encoded = chunker.tokenizer.encode(text, add_special_tokens=False)
    for start, end in encoded.offsets:
        assert all(covered[start:end]), f"token at {start}:{end} is in no chunk"


def test_a_capped_size_scales_the_overlap_in_the_same_ratio(chunker: Chunker) -> None:
    # 512/128 on a 254-token model: 254-token chunks sharing at most 63 tokens, not half of each chunk
    assert chunker.effective_overlap(512, 128) == 63
    assert chunker.effective_overlap(200, 128) == 100 and chunker.effective_overlap(200, 50) == 50  # uncapped
    sentences = [f"Claim {i} says the compound Z{i} lowers the rate of event {i} in mice." for i in range(120)]
    text = " ".join(sentences)
    capped = chunker.chunk(text, 512, 128)
    assert capped == chunker.chunk(text, 254, 63)
    for previous, chunk in itertools.pairwise(capped):
        assert chunk.start < previous.end  # still overlapping
        assert chunker.count(text[chunk.start:previous.end]) <= 64  # +1: a word split differently at the join
    embedded = sum(chunk.tokens for chunk in capped)
    assert embedded < 1.4 * chunker.count(text)  # a 127-token overlap embeds about twice the text
