"""The RAG prompt: which retrieved sources go in, in what order, and the words around them.

What repeats across requests comes first and byte-identical, so the LLM's prefix cache hits:
    [system: fixed instructions] [earlier turns] [user: "Sources:", the sources, the question, the answer instruction]
Sources are numbered by rank ([1] is the best) and written best last, next to the question, where a small model
looks. How many go in is what the context leaves after everything else and, for a small model, less: a 135M model
answers worse from three to five SQuAD paragraphs than from two (bench/rag_eval.py --parts squad). A model with
such a budget also gets only the sources that score close to the best one (`min_score_ratio`): a clearly weaker
chunk is more often a distractor it copies from than the answer the best one missed. And where dense and sparse
search both rank the same chunk first, a small model gets that chunk alone (`best_alone`): on SQuAD it then holds
the answer about nine times in ten, and a second source mostly distracts the 135M model.
"""

from __future__ import annotations

NO_SOURCES = "(no sources found)"
SOURCE_SEPARATOR_TOKENS = 2  # the blank line between sources

# (largest model, in parameters; most tokens of sources it answers well from). Larger models: the whole context.
# Measured for the 135M default on SQuAD; the 3B step is a rule of thumb, not a measurement.
SOURCE_TOKENS_BY_MODEL_SIZE = ((500_000_000, 384), (3_000_000_000, 4096))


def source_budget(parameters: int | None) -> int | None:
    """Most tokens of sources a model of this size answers well from; None: as many as its context holds."""
    if not parameters:
        return None
    return next((tokens for largest, tokens in SOURCE_TOKENS_BY_MODEL_SIZE if parameters <= largest), None)


def source_block(number: int, content: str, page: object = None) -> str:
    """One source as the LLM reads it. No document name: small models copy labels into their answers, and the
    caller gets the names in the citations, under the same numbers."""
    return f"[{number}] (page {page}) {content}" if page is not None else f"[{number}] {content}"


def sources_that_fit(costs: list[int], room: int, budget: int | None, scores: list[float] | None = None,
                     min_score_ratio: float = 0.0, best_alone: bool = False) -> int:
    """How many of the best sources go in, given each one's tokens (best first): those that fit `room` (what the
    context leaves) and `budget` (what the model reads well). The best one goes in whenever it fits the room.
    With a budget, the others also need a score of at least `min_score_ratio` times the best one's (where the best
    is positive: a ratio means nothing for logits that can be negative). `best_alone`: only the best one goes in
    (the retrievers agree on it and the model is small enough to be distracted by more)."""
    assert scores is None or len(scores) == len(costs)
    floor = None
    if budget is not None and scores and min_score_ratio > 0 and scores[0] > 0:
        floor = scores[0] * min_score_ratio
    used = spent = 0
    for number, cost in enumerate(costs):
        cost += SOURCE_SEPARATOR_TOKENS
        if spent + cost > room or (used and budget is not None and spent + cost > budget):
            break
        if used and (best_alone or (floor is not None and scores is not None and scores[number] < floor)):
            break
        used, spent = used + 1, spent + cost
    return used


def question_message(sources: list[str], question: str, instruction: str) -> str:
    """The last user message: `sources` (best first, written best last), the question, then `instruction`."""
    text = "Sources:\n" + ("\n\n".join(reversed(sources)) or NO_SOURCES) + f"\n\nQuestion: {question}"
    return f"{text}\n{instruction}" if instruction else text


def rag_messages(system_prompt: str, turns: list[dict], sources: list[str], question: str,
                 instruction: str) -> list[dict]:
    """The whole conversation sent to the LLM."""
    return [{"role": "system", "content": system_prompt}, *turns,
            {"role": "user", "content": question_message(sources, question, instruction)}]
