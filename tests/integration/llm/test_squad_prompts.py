"""bench/squad_prompts.py: the LLM-only benches' SQuAD prompts are the retriever's own, over a tiny SQuAD file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import squad_prompts
from services.retriever.prompt import rag_messages, source_block
from services.retriever.settings import RetrieverSettings

PARAGRAPHS = [
    "The Eiffel Tower was completed in 1889 for the World's Fair in Paris.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plant leaves.",
    "The Nile flows north through eleven countries before it reaches the Mediterranean Sea.",
]
QUESTIONS = [
    ("When was the Eiffel Tower completed?", "1889", 0),
    ("What do plants make from light and carbon dioxide?", "sugar and oxygen", 1),
    ("Into which sea does the Nile flow?", "the Mediterranean Sea", 2),
]


@pytest.fixture
def tiny_squad(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paragraphs = [{"context": text, "qas": [{"question": q, "answers": [{"text": a}]}
                                           for q, a, home in QUESTIONS if home == i]}
                  for i, text in enumerate(PARAGRAPHS)]
    path = tmp_path / "squad.json"
    path.write_text(json.dumps({"data": [{"title": "tiny", "paragraphs": paragraphs}]}))
    monkeypatch.setattr(squad_prompts, "SQUAD", path)


@pytest.mark.usefixtures("tiny_squad")
def test_each_question_gets_the_retrievers_prompt_over_its_best_paragraphs() -> None:
    prompts = squad_prompts.squad_rag_prompts(len(QUESTIONS), num_sources=2, seed=0)
    assert sorted(p.question for p in prompts) == sorted(q for q, _, _ in QUESTIONS)
    settings = RetrieverSettings()
    for prompt in prompts:
        _, answer, home = next(q for q in QUESTIONS if q[0] == prompt.question)
        assert prompt.answers == [answer]
        # The paragraph that holds the answer ranks first; the prompt is the retriever's layout of two sources.
        best = source_block(1, PARAGRAPHS[home])
        others = [source_block(2, text) for i, text in enumerate(PARAGRAPHS) if i != home]
        expected = [rag_messages(settings.system_prompt, [], [best, other], prompt.question,
                                 settings.answer_instruction) for other in others]
        assert prompt.messages in expected
        assert [m["role"] for m in prompt.messages] == ["system", "user"]
