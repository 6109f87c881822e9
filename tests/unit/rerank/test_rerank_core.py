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


def test_tokenizing_runs_off_the_event_loop(scorer: CrossEncoderScorer) -> None:
    import threading

    entered, release = threading.Event(), threading.Event()
    released_while_tokenizing: list[bool] = []
    real_encode = scorer.encode

    class GatedScorer:
        """The real scorer; encode waits until the event loop, still free, lets it go."""

        kind, max_length, score = scorer.kind, scorer.max_length, scorer.score

        def encode(self, query: str, passages: list[str], truncate: bool) -> list:
            entered.set()
            released_while_tokenizing.append(release.wait(15))
            return real_encode(query, passages, truncate)

    reranker = Reranker(GatedScorer(), CollectorRegistry())  # type: ignore[arg-type]

    async def main() -> object:
        reranker.start()
        try:
            ranking = asyncio.create_task(reranker.rank("cats", ["cats sit", "dogs run"], truncate=True))
            while not entered.is_set():  # the loop must keep turning while the pairs are tokenized
                await asyncio.sleep(0.01)
            release.set()
            return await ranking
        finally:
            reranker.stop()

    ranked = asyncio.run(main())
    assert released_while_tokenizing == [True] and len(ranked.logits) == 2  # type: ignore[attr-defined]
