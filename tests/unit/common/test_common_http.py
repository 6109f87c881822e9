"""ServiceClient against a real uvicorn server on loopback: retries, fail-fast, DependencyError, SSE."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse

from common.errors import APIError, error_body
from common.http import DependencyError, ServiceClient
from tests.support.processes import free_port


def flaky_app(calls: Counter) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/health/ready")
    async def ready() -> dict:
        return {"ready": True}

    @app.post("/flaky/{name}")
    async def flaky(name: str, body: dict) -> JSONResponse:
        calls[name] += 1
        if calls[name] <= body.get("fail_times", 0):
            return JSONResponse(error_body(503, "warming up"), status_code=503)
        return JSONResponse({"echo": body, "attempt": calls[name]})

    @app.post("/refuse")
    async def refuse() -> JSONResponse:
        calls["refuse"] += 1
        return JSONResponse(error_body(400, "input[0] is empty", param="input"), status_code=400)

    @app.post("/bug")
    async def bug() -> JSONResponse:
        return JSONResponse(error_body(500, "internal error: boom"), status_code=500)

    @app.post("/stream")
    async def stream() -> StreamingResponse:
        async def events():
            for i in range(3):
                yield f"data: {json.dumps({'i': i})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def server() -> tuple[str, Counter]:
    calls: Counter = Counter()
    port = free_port()
    config = uvicorn.Config(flaky_app(calls), host="127.0.0.1", port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", calls
    uv.should_exit = True
    thread.join(10)


def call(url: str, coroutine) -> object:
    async def main() -> object:
        client = ServiceClient("embed", url, retries=2, backoff=0.01)
        try:
            return await coroutine(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def test_idempotent_post_is_retried_until_it_succeeds(server: tuple[str, Counter]) -> None:
    url, _ = server
    answer = call(url, lambda c: c.post_json("/flaky/a", {"fail_times": 2}, idempotent=True))
    assert answer["attempt"] == 3


def test_retries_are_bounded(server: tuple[str, Counter]) -> None:
    url, calls = server
    with pytest.raises(DependencyError) as failed:
        call(url, lambda c: c.post_json("/flaky/b", {"fail_times": 10}, idempotent=True))
    assert calls["b"] == 3 and failed.value.status == 503
    assert "embed unavailable" in failed.value.message and "warming up" in failed.value.message


def test_non_idempotent_post_fails_fast(server: tuple[str, Counter]) -> None:
    url, calls = server
    with pytest.raises(DependencyError):
        call(url, lambda c: c.post_json("/flaky/c", {"fail_times": 1}))
    assert calls["c"] == 1


def test_client_errors_pass_through_without_retry(server: tuple[str, Counter]) -> None:
    url, calls = server
    with pytest.raises(APIError) as refused:
        call(url, lambda c: c.post_json("/refuse", {}, idempotent=True))
    assert refused.value.status == 400 and refused.value.message == "embed: input[0] is empty"
    assert calls["refuse"] == 1
    with pytest.raises(DependencyError) as bug:
        call(url, lambda c: c.post_json("/bug", {}, idempotent=True))
    assert "HTTP 500" in bug.value.message


def test_dead_dependency_is_a_503_naming_it() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DependencyError) as dead:
        call(url, lambda c: c.get_json("/v1/models"))
    assert dead.value.status == 503 and dead.value.dependency == "embed"
    assert dead.value.message == "embed unavailable: connection refused"
    assert call(url, lambda c: c.is_ready()) is False


def test_is_ready_and_sse(server: tuple[str, Counter]) -> None:
    url, _ = server
    assert call(url, lambda c: c.is_ready()) is True

    async def collect(client: ServiceClient) -> list[dict]:
        return [event async for event in client.stream_sse("/stream", {})]

    assert call(url, collect) == [{"i": 0}, {"i": 1}, {"i": 2}]
