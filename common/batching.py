"""Dynamic batching across concurrent requests, shared by the embed and rerank services.

Requests put their inputs (each with a token cost) on one bounded queue. A worker thread takes a window
from the head of the queue, sorts it by length, cuts it into batches bounded by a size and a padded-token
budget, runs the model on each, and routes every result back to the request it came from, in order. A full
queue refuses new work with 429 at once.

The cut is the one with the least work: each batch costs its padded tokens (inputs x the longest) plus a fixed
`batch_overhead`, the cost of one more model call in tokens. So a window of 254-token chunks and their
60-token tails runs as two batches rather than padding the tails to 254, while inputs of nearly equal length
stay together.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Gauge, Histogram

from common.errors import APIError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class QueueFull(APIError):
    def __init__(self, name: str, capacity: int) -> None:
        super().__init__(429, f"{name} queue is full ({capacity} inputs waiting); retry later",
                         code="queue_full")


@dataclass(slots=True)
class BatcherMetrics:
    batch_size: Histogram
    batch_tokens: Histogram
    queue_depth: Gauge
    batch_seconds: Histogram

    @classmethod
    def create(cls, registry: CollectorRegistry, prefix: str) -> BatcherMetrics:
        sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
        return cls(
            batch_size=Histogram(f"{prefix}_batch_size", "inputs per model batch", buckets=sizes,
                                 registry=registry),
            batch_tokens=Histogram(f"{prefix}_batch_tokens", "padded tokens per model batch",
                                   buckets=(64, 256, 1024, 4096, 16384, 65536), registry=registry),
            queue_depth=Gauge(f"{prefix}_queue_depth", "inputs waiting for a batch", registry=registry),
            batch_seconds=Histogram(f"{prefix}_batch_seconds", "model time per batch",
                                    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                                    registry=registry),
        )


@dataclass(slots=True, eq=False)
class _Request:
    results: list[Any]
    remaining: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


@dataclass(slots=True)
class _Item:
    request: _Request
    index: int
    value: Any
    cost: int


@dataclass(slots=True)
class DynamicBatcher(Generic[T, R]):
    """`run_batch(inputs) -> outputs` (same length, same order) runs on the worker thread."""

    run_batch: Callable[[list[T]], list[R]]
    name: str = "batcher"
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_queue_items: int = 4096
    # A model call's fixed cost, in padded tokens: all-MiniLM-L6-v2 in bf16 on 2 AMX cores takes about 12 ms for
    # one short input, the time a full batch spends on about 250 tokens.
    batch_overhead: int = 256
    metrics: BatcherMetrics | None = None
    _queue: deque[_Item] = field(default_factory=deque)
    _wakeup: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None
    _stopping: bool = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name=f"{self.name}-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, inputs: Sequence[T], costs: Sequence[int]) -> list[R]:
        assert len(inputs) == len(costs)
        if not inputs:
            return []
        loop = asyncio.get_running_loop()
        request = _Request([None] * len(inputs), len(inputs), loop.create_future(), loop)
        with self._wakeup:
            if len(self._queue) + len(inputs) > self.max_queue_items:
                raise QueueFull(self.name, self.max_queue_items)
            self._queue.extend(_Item(request, i, value, max(1, cost))
                               for i, (value, cost) in enumerate(zip(inputs, costs, strict=True)))
            self._observe_depth()
            self._wakeup.notify()
        return await request.future

    def _observe_depth(self) -> None:
        if self.metrics:
            self.metrics.queue_depth.set(len(self._queue))

    def _work(self) -> None:
        while True:
            with self._wakeup:
                while not self._queue and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                window = [self._queue.popleft() for _ in range(min(len(self._queue), 4 * self.max_batch_size))]
                self._observe_depth()
            live = [item for item in window if not item.request.future.done()]
            for batch in self._cut(sorted(live, key=lambda item: item.cost)):
                self._run(batch)

    def _cut(self, items: list[_Item]) -> list[list[_Item]]:
        """Length-sorted items cut into consecutive runs within the size and padded-token limits, the runs chosen
        to minimise padded tokens plus `batch_overhead` per run (an exact dynamic programme over the cut points).
        An item over the token budget on its own still runs, alone."""
        n = len(items)
        best = [0] * (n + 1)  # best[i]: least cost of the first i items
        start = [0] * (n + 1)  # start[i]: where the last run of that best cut begins
        for end in range(1, n + 1):
            width = items[end - 1].cost  # sorted ascending: the run's longest
            best[end], start[end] = best[end - 1] + self.batch_overhead + width, end - 1
            for size in range(2, min(self.max_batch_size, end) + 1):
                if size * width > self.max_batch_tokens:
                    break
                cost = best[end - size] + self.batch_overhead + size * width
                if cost < best[end]:
                    best[end], start[end] = cost, end - size
        batches: list[list[_Item]] = []
        end = n
        while end > 0:
            batches.append(items[start[end]:end])
            end = start[end]
        return batches[::-1]

    def _run(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        try:
            outputs = self.run_batch([item.value for item in batch])
            assert len(outputs) == len(batch), "run_batch must return one output per input"
        except Exception as exc:
            log.exception("%s batch of %d failed", self.name, len(batch))
            for request in {item.request for item in batch}:
                request.loop.call_soon_threadsafe(_fail, request.future, exc)
            return
        if self.metrics:
            self.metrics.batch_size.observe(len(batch))
            self.metrics.batch_tokens.observe(batch[-1].cost * len(batch))
            self.metrics.batch_seconds.observe(time.perf_counter() - start)
        for item, output in zip(batch, outputs, strict=True):
            request = item.request
            request.results[item.index] = output
            request.remaining -= 1
            if request.remaining == 0:
                request.loop.call_soon_threadsafe(_succeed, request.future, request.results)


def _succeed(future: asyncio.Future, value: object) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
