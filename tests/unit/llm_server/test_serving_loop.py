"""The serving loop over the real engine (bundled SmolLM2), without HTTP."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from common.errors import APIError
from common.health import Readiness
from common.model_files import bundled_llm
from services.llm.serving import ServingLoop, ServingMetrics

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def engine() -> Any:
    from services.llm.engine import EngineConfig, LLMEngine

    # fp32: a choice's tokens must not depend on what shares its batch (a sibling that stops early); in bf16 the
    # GEMMs of a 1-row and a 2-row step round differently on CPUs without AMX, and sampled text diverges.
    return LLMEngine(EngineConfig(model=str(bundled_llm()), device="cpu", dtype="float32", kv_cache_gib=0.1,
                                  max_model_len=512))


@pytest.fixture(scope="module")
def offline_answer(engine: Any) -> str:
    """Computed before any serving loop exists: the engine must only ever be driven by one thread."""
    output = engine.generate([prompt(engine)], params(10), use_tqdm=False)[0]
    return engine.tokenizer.decode(output.outputs[0].token_ids, skip_special_tokens=True)


@pytest.fixture
def serving(engine: Any) -> Iterator[ServingLoop]:
    loop = ServingLoop(engine, max_num_seqs=4, max_waiting=2, request_timeout=60,
                       metrics=ServingMetrics(CollectorRegistry()), readiness=Readiness())
    loop.start()
    yield loop
    asyncio.run(loop.shutdown(timeout=5))


def params(max_tokens: int, **extra: Any) -> Any:
    from services.llm.engine import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)


def prompt(engine: Any, text: str = "Once upon a time") -> list[int]:
    return engine.tokenizer.encode(text)


def test_answer_matches_offline_generate(engine: Any, offline_answer: str, serving: ServingLoop) -> None:
    async def run() -> str:
        pieces = []
        async for update in serving.generate(prompt(engine), params(10)):
            pieces.extend(d.text for d in update.choices)
        return "".join(pieces)

    assert asyncio.run(run()) == offline_answer


def test_closing_the_stream_aborts_in_the_engine(engine: Any, serving: ServingLoop) -> None:
    async def run() -> None:
        stream = serving.generate(prompt(engine), params(400, ignore_eos=True))
        await anext(stream)
        await stream.aclose()
        assert serving.in_flight == 0
        for _ in range(200):
            if not engine.has_unfinished() and engine.stats().kv_usage == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the engine still holds the request")

    asyncio.run(run())


def test_over_capacity_is_429(engine: Any, serving: ServingLoop) -> None:
    async def run() -> None:
        streams = [serving.generate(prompt(engine), params(50, ignore_eos=True)) for _ in range(6)]
        for stream in streams:
            await anext(stream)
        with pytest.raises(APIError) as refused:
            await anext(serving.generate(prompt(engine), params(5)))
        assert refused.value.status == 429
        for stream in streams:
            await stream.aclose()

    asyncio.run(run())


def test_engine_thread_sleeps_when_idle(engine: Any, serving: ServingLoop) -> None:
    steps = threading.Event()
    original = engine.step

    def counting_step() -> list:
        steps.set()
        return original()

    engine.step = counting_step
    try:
        assert not steps.wait(0.3)  # nothing to do: the thread waits on its condition instead of stepping
    finally:
        del engine.step


def test_engine_failure_fails_requests_and_readiness(engine: Any, serving: ServingLoop) -> None:
    def broken_step() -> list:
        raise RuntimeError("device lost")

    engine.step = broken_step  # a fault injected into the real engine
    try:
        async def run() -> APIError:
            with pytest.raises(APIError) as failed:
                async for _ in serving.generate(prompt(engine), params(5)):
                    pass
            return failed.value

        error = asyncio.run(run())
    finally:
        del engine.step
        for request_id in list(engine.requests):
            engine.abort(request_id)
        engine.step()
    assert error.status == 500 and "device lost" in error.message
    assert not serving.readiness.ready and "device lost" in serving.readiness.message
    with pytest.raises(APIError) as refused:
        serving.check_accepting()
    assert refused.value.status == 503


def test_a_choice_that_reaches_a_stop_string_ends_in_the_engine_while_its_sibling_goes_on(
        engine: Any, serving: ServingLoop) -> None:
    from services.llm.engine import SamplingParams

    max_tokens = 40
    sampled = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=11, n=2, ignore_eos=True)

    async def run(stop: list[str]) -> tuple[dict[int, str], dict[int, str | None], int]:
        before = engine.stats().generation_tokens_total
        texts: dict[int, str] = {0: "", 1: ""}
        finish: dict[int, str | None] = {}
        async for update in serving.generate(prompt(engine), sampled, stop):
            for delta in update.choices:
                texts[delta.index] += delta.text
                finish[delta.index] = delta.finish_reason
        for _ in range(500):  # the engine's last output for the request follows the stream's end
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        return texts, finish, engine.stats().generation_tokens_total - before

    free, _, generated = asyncio.run(run([]))
    assert generated == 2 * max_tokens
    # A stop string early in choice 0's (seeded, so repeatable) text that choice 1 never produces.
    stop = next(free[0][start:start + 4] for start in range(len(free[0]) - 4)
                if free[0][start:start + 4].strip() and free[0][start:start + 4] not in free[1])
    cut = free[0].find(stop)
    assert cut < 30, (stop, free)
    texts, finish, generated = asyncio.run(run([stop]))
    assert texts == {0: free[0][:cut], 1: free[1]} and finish == {0: "stop", 1: "length"}
    # Choice 0 stopped generating a few tokens after its stop string, not when its sibling finished.
    assert generated < 2 * max_tokens
