"""The retriever's prompts to the LLM for SQuAD questions, built offline for LLM-only benchmarks.

Each paragraph of the shared SQuAD dev articles is one document; a question's sources are the paragraphs the
bundled embedding model ranks highest for it (dense search, as the retriever's dense mode does), laid out
by the retriever's own prompt assembly (services/retriever/prompt.py: system prompt, source blocks, question
message and answer instruction). Questions are shuffled with a
fixed seed. Needs ../shared/eval/squad (see its README).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SQUAD = ROOT.parent / "shared" / "eval" / "squad" / "dev-v1.1-articles-00-23.json"


@dataclass(slots=True)
class SquadPrompt:
    question: str
    answers: list[str]
    messages: list[dict[str, str]]  # system + user, as the retriever sends them


def squad_rag_prompts(count: int, num_sources: int = 4, seed: int = 0) -> list[SquadPrompt]:
    from sentence_transformers import SentenceTransformer

    from common.model_files import bundled_embedding_model
    from services.retriever.prompt import rag_messages, source_block
    from services.retriever.settings import RetrieverSettings

    data = json.loads(SQUAD.read_text())["data"]
    paragraphs, questions = [], []
    for article in data:
        for paragraph in article["paragraphs"]:
            paragraphs.append(paragraph["context"])
            questions.extend((qa["question"], [a["text"] for a in qa["answers"]]) for qa in paragraph["qas"])
    random.Random(seed).shuffle(questions)
    questions = questions[:count]
    encoder = SentenceTransformer(str(bundled_embedding_model()), device="cpu")
    docs = encoder.encode(paragraphs, batch_size=64, normalize_embeddings=True, convert_to_tensor=True,
                          show_progress_bar=True)
    queries = encoder.encode([q for q, _ in questions], normalize_embeddings=True, convert_to_tensor=True)
    top = (queries @ docs.T).topk(num_sources, dim=-1).indices.tolist()
    settings = RetrieverSettings()
    prompts = []
    for (question, answers), ranked in zip(questions, top, strict=True):
        sources = [source_block(n, paragraphs[i]) for n, i in enumerate(ranked, start=1)]
        messages = rag_messages(settings.system_prompt, [], sources, question, settings.answer_instruction)
        prompts.append(SquadPrompt(question, answers, messages))
    return prompts
