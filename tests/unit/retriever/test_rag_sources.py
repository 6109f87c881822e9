"""Which retrieved sources a RAG answer gets, on hand-made hits: the pipeline's fit, without HTTP."""

from __future__ import annotations

import pytest

from services.retriever.knowledge_base import Hit
from services.retriever.rag import RagPipeline
from services.retriever.store import ChunkRow

pytestmark = pytest.mark.anyio


class SizedLLM:
    """An LLM of `parameters` with a roomy context, counting a token per word."""

    def __init__(self, parameters: int | None) -> None:
        self._parameters = parameters

    async def context_length(self) -> int:
        return 8192

    async def parameters(self) -> int | None:
        return self._parameters

    async def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(text.split()) for text in texts]

    async def count_messages(self, messages: list[dict]) -> int:
        return sum(len(str(m["content"]).split()) + 8 for m in messages)


def _hits() -> list[Hit]:
    # hybrid search's fused scores: the best ranked first by dense and sparse, the next two close behind
    scores = [2 / 61, 2 / 62, 1 / 61 + 1 / 63]
    return [Hit(ChunkRow(n, "kb", f"doc{n}", f"doc{n}.txt", 0, f"paragraph {n} " * 30, {}), score)
            for n, score in enumerate(scores)]


def _pipeline(parameters: int | None, sole_source_parameters: int = 500_000_000) -> RagPipeline:
    return RagPipeline(None, SizedLLM(parameters), None, system_prompt="Answer from the sources.",  # type: ignore[arg-type]
                       vdb_top_k=40, reranker_top_k=5, default_max_tokens=32, min_score_ratio=0.95,
                       sole_source_parameters=sole_source_parameters)


@pytest.mark.parametrize(("parameters", "unanimous", "sole_source_parameters", "sources"), [
    (135_000_000, True, 500_000_000, 1),  # a small model, the retrievers agree: the best alone
    (135_000_000, False, 500_000_000, 3),  # they disagree: the score cut-off decides
    (135_000_000, True, 0, 3),  # the setting off
    (1_700_000_000, True, 500_000_000, 3),  # a bigger model reads the others well
    (None, True, 500_000_000, 3),  # a card without a size: not assumed small
])
async def test_a_small_model_gets_the_source_both_retrievers_rank_first_alone(
        parameters: int | None, unanimous: bool, sole_source_parameters: int, sources: int) -> None:
    pipeline = _pipeline(parameters, sole_source_parameters)
    messages, used = await pipeline._fit("Which paragraph?", [], _hits(), 32, unanimous)
    assert [hit.chunk.document_id for hit in used] == [f"doc{n}" for n in range(sources)]
    assert messages[-1]["content"].count("paragraph 0") == 30 and messages[-1]["content"].count("[") == sources
