"""DynamicBatcher: results routed back in order, length-sorted batches within budgets, 429 when full, errors."""

from __future__ import annotations

import asyncio
import threading

import pytest

from common.batching import DynamicBatcher, QueueFull


class RecordingModel:
    """Doubles each input and remembers the batches it saw; can be held to let the queue fill."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()
        self.fail_on = fail_on

    def __call__(self, batch: list[int]) -> list[int]:
        self.release.wait(10)
        self.batches.append(list(batch))
        if self.fail_on is not None and self.fail_on in batch:
            raise ValueError(f"cannot embed {self.fail_on}")
        return [2 * value for value in batch]


async def drained(batcher: DynamicBatcher) -> None:
    """Let pending submits enqueue, then wait until the worker has taken everything queued."""
    await asyncio.sleep(0)
    while batcher.depth:
        await asyncio.sleep(0.01)


def run_with(batcher: DynamicBatcher, coroutine_factory) -> object:
    async def main() -> object:
        batcher.start()
        try:
            return await coroutine_factory()
        finally:
            batcher.stop()

    return asyncio.run(main())


def test_each_request_gets_its_own_results_in_order() -> None:
    model = RecordingModel()
    batcher = DynamicBatcher(model, max_batch_size=4, max_batch_tokens=10_000)
    requests = [[100 * r + i for i in range(r % 5 + 1)] for r in range(20)]

    async def go() -> list[list[int]]:
        return await asyncio.gather(*(batcher.submit(values, [v % 7 + 1 for v in values]) for values in requests))

    results = run_with(batcher, go)
    assert results == [[2 * v for v in values] for values in requests]
    assert all(len(batch) <= 4 for batch in model.batches)


def test_batches_are_length_sorted_and_within_the_token_budget() -> None:
    model = RecordingModel()
    model.release.clear()  # hold the worker so every input is queued before the first batch is cut
    batcher = DynamicBatcher(model, max_batch_size=8, max_batch_tokens=40)
    costs = {value: value for value in (9, 1, 5, 3, 7, 2, 8, 4, 6, 10)}

    async def go() -> list[list[int]]:
        first = asyncio.ensure_future(batcher.submit([0], [1]))  # occupies the held worker
        await drained(batcher)
        rest = [asyncio.ensure_future(batcher.submit([v], [c])) for v, c in costs.items()]
        await asyncio.sleep(0)
        assert batcher.depth == len(costs)
        model.release.set()
        return await asyncio.gather(first, *rest)

    run_with(batcher, go)
    later = [batch for batch in model.batches if batch != [0]]
    flat = [value for batch in later for value in batch]
    assert flat == sorted(costs)  # one window, sorted by cost
    for batch in later:
        assert max(costs[v] for v in batch) * len(batch) <= 40 or len(batch) == 1


def test_full_queue_refuses_with_429_at_once() -> None:
    model = RecordingModel()
    model.release.clear()
    batcher = DynamicBatcher(model, max_batch_size=1, max_queue_items=3)

    async def go() -> None:
        held = asyncio.ensure_future(batcher.submit([1], [1]))
        await drained(batcher)  # the worker took it and is held; the queue is empty again
        queued = asyncio.ensure_future(batcher.submit([2, 3, 4], [1, 1, 1]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as refused:
            await batcher.submit([5], [1])
        assert refused.value.status == 429 and refused.value.code == "queue_full"
        model.release.set()
        assert await held == [2] and await queued == [4, 6, 8]

    run_with(batcher, go)


def test_a_failing_batch_fails_its_requests_only() -> None:
    model = RecordingModel(fail_on=13)
    batcher = DynamicBatcher(model, max_batch_size=1)

    async def go() -> None:
        bad, good = await asyncio.gather(batcher.submit([13], [1]), batcher.submit([4], [1]), return_exceptions=True)
        assert isinstance(bad, ValueError) and "13" in str(bad)
        assert good == [8]
        assert await batcher.submit([5], [1]) == [10]  # the worker survived

    run_with(batcher, go)


def test_empty_submit_returns_at_once() -> None:
    batcher = DynamicBatcher(RecordingModel())
    assert run_with(batcher, lambda: batcher.submit([], [])) == []
