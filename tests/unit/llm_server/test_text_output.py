"""The stop-string matcher and the incremental detokenizer, without a server or an engine."""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from common.model_files import bundled_llm
from services.llm.serving import AnswerText, IncrementalDetokenizer
from services.llm.stop_strings import StopStringMatcher

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    path = bundled_llm()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def feed(matcher: StopStringMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.push(piece) for piece in pieces)
    return out + matcher.flush()


def test_stop_string_spanning_pieces_is_cut_and_not_emitted() -> None:
    matcher = StopStringMatcher(["o w"])
    assert matcher.push("Hel") == "Hel"
    assert matcher.push("lo") == "l"  # "o" could start "o w"
    assert matcher.push(" wor") == ""
    assert matcher.stopped
    assert matcher.push("ld") == ""


def test_partial_match_that_does_not_complete_is_released() -> None:
    matcher = StopStringMatcher(["bc"])
    assert matcher.push("ab") == "a"
    assert matcher.push("d") == "bd"
    assert not matcher.stopped
    assert matcher.push("xb") == "x"
    assert matcher.flush() == "b"


def test_earliest_of_several_stop_strings_wins() -> None:
    matcher = StopStringMatcher(["END", "\n\n"])
    assert feed(matcher, ["one\n", "\ntwo END"]) == "one"
    assert matcher.stopped


def test_no_stop_strings_passes_text_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.push("abc") == "abc"
    assert matcher.flush() == ""


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="abc ", max_size=30), stops=st.lists(st.text(alphabet="abc ", min_size=1, max_size=4),
                                                                     max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=6))
# Cases the property once found on random seeds: a push completes a later stop while an earlier one is still open.
@example(text="baa", stops=["baa", "a"], cuts=[2])
@example(text="ba bb", stops=[" aa", " ", "a b"], cuts=[3])
@example(text="ba", stops=["baa", "a"], cuts=[])
def test_any_split_gives_the_text_before_the_first_stop(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    positions = [text.find(s) for s in stops if s in text]
    expected = text[:min(positions)] if positions else text
    matcher = StopStringMatcher(stops)
    assert feed(matcher, pieces) == expected
    assert matcher.stopped == bool(positions)


def test_detokenizer_never_emits_half_characters(tokenizer: Any) -> None:
    text = "Grüße aus 東京 🎉🎉 and naïve café — done."
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    assert "\ufffd" in "".join(tokenizer.decode([t]) for t in token_ids)  # single tokens do split characters
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push([t]) for t in token_ids]
    pieces.append(detokenizer.flush())
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(token_ids)


def test_detokenizer_keeps_leading_space_after_prompt(tokenizer: Any) -> None:
    prompt = tokenizer.encode("The capital of France is", add_special_tokens=False)
    answer = tokenizer.encode(" Paris, of course.", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(detokenizer.push([t]) for t in answer) + detokenizer.flush() == " Paris, of course."


@settings(max_examples=40, deadline=None)
@given(text=st.text(max_size=40), step=st.integers(1, 4))
def test_detokenizer_output_equals_full_decode(tokenizer: Any, text: str, step: int) -> None:
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(token_ids[i:i + step]) for i in range(0, len(token_ids), step)]
    assert "".join(pieces) + detokenizer.flush() == tokenizer.decode(token_ids)


def test_answer_text_stops_on_string_across_tokens(tokenizer: Any) -> None:
    token_ids = tokenizer.encode("alpha beta. gamma delta", add_special_tokens=False)
    answer = AnswerText(0, tokenizer, [], ["a. g"])
    deltas = [answer.push([t], None, None) for t in token_ids]
    text = "".join(d.text for d in deltas if d is not None)
    assert text == "alpha bet"
    assert answer.finish_reason == "stop"
    assert answer.push([token_ids[0]], None, None) is None  # later tokens are ignored


def test_answer_text_flushes_held_text_when_engine_finishes(tokenizer: Any) -> None:
    token_ids = tokenizer.encode("one two thr", add_special_tokens=False)
    answer = AnswerText(0, tokenizer, [], ["three"])
    texts = [answer.push([t], None, "length" if i == len(token_ids) - 1 else None)
             for i, t in enumerate(token_ids)]
    assert "".join(d.text for d in texts if d is not None) == "one two thr"
    assert answer.finish_reason == "length"
    assert answer.num_tokens == len(token_ids)
