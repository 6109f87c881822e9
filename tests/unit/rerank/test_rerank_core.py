"""The reranking core: batching across concurrent calls and the bounded queue, in-process."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from prometheus_client import CollectorRegistry

from common.batching import QueueFull
from services.rerank.reranker import Reranker
from services.rerank.scorers import CrossEncoderScorer
from tests.unit.rerank.tiny_rerank_models import build_cross_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def scorer(tmp_path_factory: pytest.TempPathFactory) -> CrossEncoderScorer:
    return CrossEncoderScorer(str(build_cross_encoder(tmp_path_factory.mktemp("bert"))), torch.device("cpu"))


def test_concurrent_calls_get_their_own_scores(scorer: CrossEncoderScorer) -> None:
    reranker = Reranker(scorer, CollectorRegistry(), max_batch_size=8)
    queries = [f"the cat sat on the mat {'dog ' * n}" for n in range(12)]
    passages = [[f"cats and dogs {'sun ' * k}" for k in range(1 + n % 5)] for n in range(12)]

    async def rank_all() -> list:
        reranker.start()
        try:
            return await asyncio.gather(*(reranker.rank(q, p, truncate=True) for q, p in zip(queries, passages,
                                                                                              strict=True)))
        finally:
            reranker.stop()

    together = asyncio.run(rank_all())
    for query, texts, ranked in zip(queries, passages, together, strict=True):
        alone = scorer.score(scorer.encode(query, texts, truncate=True))
        assert ranked.logits == pytest.approx(alone, abs=1e-4)
        assert ranked.total_tokens == sum(p.cost for p in scorer.encode(query, texts, truncate=True))


def test_a_full_queue_refuses_with_429(scorer: CrossEncoderScorer) -> None:
    reranker = Reranker(scorer, CollectorRegistry(), max_queue=4)  # never started: nothing drains the queue

    async def rank() -> None:
        await reranker.rank("cats", ["a", "b", "c", "d", "e"], truncate=True)

    with pytest.raises(QueueFull) as refused:
        asyncio.run(rank())
    assert refused.value.status == 429
