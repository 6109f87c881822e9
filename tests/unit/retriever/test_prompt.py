"""The RAG prompt's assembly: which sources go in, their order, and the fixed head every answer shares."""

from __future__ import annotations

from services.retriever.prompt import (
    NO_SOURCES,
    SOURCE_SEPARATOR_TOKENS,
    question_message,
    rag_messages,
    source_block,
    source_budget,
    sources_that_fit,
)

SYSTEM = "Answer from the sources."
INSTRUCTION = "Quote the answer."


def test_a_small_model_reads_fewer_source_tokens_than_a_large_one() -> None:
    small, mid, large = source_budget(135_000_000), source_budget(1_700_000_000), source_budget(8_000_000_000)
    assert small is not None and mid is not None and small < mid
    assert large is None  # as many as the context holds
    assert source_budget(None) is None and source_budget(0) is None  # a card that does not say: no cap


def test_sources_stop_at_the_first_that_overflows_the_room_or_the_budget() -> None:
    costs = [100, 100, 100, 100]
    step = 100 + SOURCE_SEPARATOR_TOKENS
    assert sources_that_fit(costs, room=10_000, budget=None) == 4
    assert sources_that_fit(costs, room=3 * step, budget=None) == 3
    assert sources_that_fit(costs, room=10_000, budget=2 * step) == 2
    assert sources_that_fit(costs, room=10_000, budget=2 * step - 1) == 1
    assert sources_that_fit([], room=10_000, budget=None) == 0


def test_the_best_source_goes_in_past_the_budget_but_never_past_the_room() -> None:
    assert sources_that_fit([900, 50], room=1000, budget=384) == 1
    assert sources_that_fit([1200, 50], room=1000, budget=384) == 0


def test_sources_are_written_best_last_next_to_the_question_then_the_instruction() -> None:
    blocks = [source_block(1, "best"), source_block(2, "second"), source_block(3, "third", page=7)]
    text = question_message(blocks, "What?", INSTRUCTION)
    assert text == ("Sources:\n[3] (page 7) third\n\n[2] second\n\n[1] best\n\n"
                    "Question: What?\nQuote the answer.")
    assert question_message([], "What?", "") == f"Sources:\n{NO_SOURCES}\n\nQuestion: What?"


def test_every_answer_shares_a_byte_identical_head_for_the_prefix_cache() -> None:
    one = rag_messages(SYSTEM, [], [source_block(1, "alpha")], "First question?", INSTRUCTION)
    two = rag_messages(SYSTEM, [], [source_block(1, "beta"), source_block(2, "gamma")], "Second?", INSTRUCTION)
    assert one[0] == two[0] == {"role": "system", "content": SYSTEM}
    assert one[1]["content"].startswith("Sources:\n[") and two[1]["content"].startswith("Sources:\n[")
    turns = [{"role": "user", "content": "Earlier."}, {"role": "assistant", "content": "Noted."}]
    assert rag_messages(SYSTEM, turns, [], "Q?", "")[:3] == [one[0], *turns]


def test_a_budgeted_model_gets_only_the_sources_that_score_near_the_best() -> None:
    costs, scores = [100, 100, 100], [0.032, 0.030, 0.016]  # the third: found by one retriever of two
    assert sources_that_fit(costs, room=10_000, budget=1000, scores=scores, min_score_ratio=0.9) == 2
    assert sources_that_fit(costs, room=10_000, budget=1000, scores=scores, min_score_ratio=0.95) == 1
    assert sources_that_fit(costs, room=10_000, budget=1000, scores=scores, min_score_ratio=0.0) == 3
    # the first weak source ends the list, as the budget does: sources stay a prefix of the ranking
    assert sources_that_fit(costs, room=10_000, budget=1000, scores=[0.032, 0.016, 0.031], min_score_ratio=0.9) == 1


def test_the_score_cut_off_spares_unbudgeted_models_and_scores_that_are_not_positive() -> None:
    costs = [100, 100]
    assert sources_that_fit(costs, room=10_000, budget=None, scores=[0.9, 0.1], min_score_ratio=0.9) == 2
    assert sources_that_fit(costs, room=10_000, budget=1000, scores=[-1.0, -5.0], min_score_ratio=0.9) == 2
    assert sources_that_fit(costs, room=10_000, budget=1000, scores=[0.9, 0.1], min_score_ratio=0.9) == 1


def test_a_best_source_the_retrievers_agree_on_goes_in_alone() -> None:
    costs, scores = [100, 100, 100], [2 / 61, 2 / 62, 1 / 61 + 1 / 63]  # without it, the ratio lets all three in
    assert sources_that_fit(costs, room=10_000, budget=1000, scores=scores, min_score_ratio=0.95) == 3
    assert sources_that_fit(costs, room=10_000, budget=1000, scores=scores, min_score_ratio=0.95,
                            best_alone=True) == 1
    assert sources_that_fit([1200, 50], room=1000, budget=384, best_alone=True) == 0  # still never past the room
