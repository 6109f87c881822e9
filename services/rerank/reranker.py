"""The reranking core: tokenize pairs on a tokenizer thread, score them through the shared dynamic batcher.

Importable without FastAPI; the service, tests and benchmarks all call `Reranker.rank`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from common.batching import BatcherMetrics, DynamicBatcher
from common.offload import SerialThread
from services.rerank.scorers import EncodedPair, Scorer


@dataclass(slots=True)
class RankedPassages:
    logits: list[float]  # one per passage, in request order
    total_tokens: int


class Reranker:
    def __init__(self, scorer: Scorer, registry: CollectorRegistry, *, max_batch_size: int = 32,
                 max_batch_tokens: int = 8192, max_queue: int = 4096) -> None:
        self.scorer = scorer
        self.batcher: DynamicBatcher[EncodedPair, float] = DynamicBatcher(
            scorer.score, name="rerank", max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
            max_queue_items=max_queue, metrics=BatcherMetrics.create(registry, "rerank"))
        self.requests = Counter("rerank_requests", "ranking requests scored", registry=registry)
        self.passages = Counter("rerank_passages", "passages scored", registry=registry)
        self.tokens = Counter("rerank_tokens", "tokens of scored query + passage pairs", registry=registry)
        self._tokenizing = SerialThread("rerank-tokenize")  # off the event loop: 512 passages take a while

    def start(self) -> None:
        self.batcher.start()

    def stop(self) -> None:
        self.batcher.stop()
        self._tokenizing.shutdown()

    async def rank(self, query: str, passages: list[str], truncate: bool) -> RankedPassages:
        pairs = await self._tokenizing.run(self.scorer.encode, query, passages, truncate)
        logits = await self.batcher.submit(pairs, [pair.cost for pair in pairs])
        total_tokens = sum(pair.cost for pair in pairs)
        self.requests.inc()
        self.passages.inc(len(pairs))
        self.tokens.inc(total_tokens)
        return RankedPassages(logits, total_tokens)
