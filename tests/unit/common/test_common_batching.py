"""DynamicBatcher: results routed back in order, length-sorted batches within budgets, the cheapest cut of a
window, 429 when full, errors."""

from __future__ import annotations

import asyncio
import itertools
import random
import threading

import pytest

from common.batching import DynamicBatcher, QueueFull, _Item


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


def cut_costs(batcher: DynamicBatcher, costs: list[int]) -> list[list[int]]:
    items = [_Item(None, i, i, cost) for i, cost in enumerate(costs)]
    return [[item.cost for item in batch] for batch in batcher._cut(items)]


def test_a_window_is_cut_where_padding_would_cost_more_than_another_model_call() -> None:
    batcher = DynamicBatcher(RecordingModel(), max_batch_size=64, max_batch_tokens=100_000, batch_overhead=256)
    # Padding eight 60-token tails to 254 costs 1,552 tokens, more than a second call's 256.
    assert cut_costs(batcher, [60] * 8 + [254] * 8) == [[60] * 8, [254] * 8]
    # Nearly equal lengths stay together: padding them costs 16 tokens, less than a call.
    assert cut_costs(batcher, [250] * 4 + [254] * 4) == [[250] * 4 + [254] * 4]


def cost_of(batches: list[list[int]], overhead: int) -> int:
    return sum(overhead + len(batch) * max(batch) for batch in batches)


def cheapest_cut(costs: list[int], size: int, budget: int, overhead: int) -> int:
    """By brute force: every way to cut the sorted costs into consecutive runs that respect the limits (a run of one
    is always allowed)."""
    best = None
    for cuts in itertools.product([False, True], repeat=len(costs) - 1):
        batches, current = [], [costs[0]]
        for cost, cut in zip(costs[1:], cuts, strict=True):
            if cut:
                batches.append(current)
                current = []
            current.append(cost)
        batches.append(current)
        if all(len(b) == 1 or (len(b) <= size and len(b) * max(b) <= budget) for b in batches):
            total = cost_of(batches, overhead)
            best = total if best is None else min(best, total)
    return best


def test_the_cut_is_the_cheapest_one_within_the_limits() -> None:
    rng = random.Random(0)
    for _ in range(300):
        costs = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 9)))
        size, budget, overhead = rng.randint(1, 5), rng.randint(40, 200), rng.choice([0, 5, 40, 500])
        batcher = DynamicBatcher(RecordingModel(), max_batch_size=size, max_batch_tokens=budget,
                                 batch_overhead=overhead)
        batches = cut_costs(batcher, costs)
        assert [c for batch in batches for c in batch] == costs
        assert all(len(b) == 1 or (len(b) <= size and len(b) * max(b) <= budget) for b in batches)
        assert cost_of(batches, overhead) == cheapest_cut(costs, size, budget, overhead), (costs, size, budget)


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
