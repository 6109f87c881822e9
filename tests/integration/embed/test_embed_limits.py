"""The embed service's guards as a real process: API key, body and input limits, a full queue, a bad model."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.support.processes import ServiceProcess

KEY = "test-secret"
ENV = {"HF_HUB_OFFLINE": "1", "EMBED_LOG_LEVEL": "warning", "API_KEY": KEY,
       "EMBED_MAX_BODY_BYTES": "8000", "EMBED_MAX_INPUTS_PER_REQUEST": "4",
       # One input per batch and room for two requests: a burst must overflow the queue.
       "EMBED_MAX_BATCH_SIZE": "1", "EMBED_MAX_QUEUE": "8"}
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = "the receptor binding domain of the viral spike protein " * 18  # about 200 tokens


@pytest.fixture(scope="module")
def server() -> ServiceProcess:
    process = ServiceProcess("embed", env=ENV).start()
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_api_key_required_but_health_open(server: ServiceProcess) -> None:
    assert httpx.get(server.url + "/v1/health/live").status_code == 200
    assert httpx.get(server.url + "/v1/health/ready").status_code == 200
    assert error_of(httpx.post(server.url + "/v1/embeddings", json={"input": "x"}), 401)["message"] == \
        "missing API key"
    wrong = httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer no"})
    assert error_of(wrong, 401)["message"] == "invalid API key"
    assert error_of(httpx.get(server.url + "/v1/models"), 401)
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "x"}, headers=AUTH).status_code == 200


def test_openai_client_with_key(server: ServiceProcess) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert len(client.embeddings.create(input="x", model="sentence-transformers/all-MiniLM-L6-v2").data) == 1
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong").embeddings.create(input="x", model="m")


def test_body_over_the_limit_is_413(server: ServiceProcess) -> None:
    response = httpx.post(server.url + "/v1/embeddings", json={"input": "x" * 9000}, headers=AUTH)
    assert "8000" in error_of(response, 413)["message"]


def test_too_many_inputs_is_413(server: ServiceProcess) -> None:
    response = httpx.post(server.url + "/v1/embeddings", json={"input": ["a"] * 5}, headers=AUTH)
    assert "4" in error_of(response, 413)["message"]


def test_full_queue_answers_429_at_once_and_recovers(server: ServiceProcess) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": [LONG] * 4})
                                          for _ in range(48)))

    responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) > 0 and statuses.count(200) > 0, statuses
    refused = next(response for response in responses if response.status_code == 429)
    assert error_of(refused, 429)["code"] == "queue_full"
    assert refused.headers["retry-after"] == "1"
    assert httpx.post(server.url + "/v1/embeddings", json={"input": "after"}, headers=AUTH).status_code == 200


def test_model_that_fails_to_load_stays_unready_but_live(tmp_path: object) -> None:
    env = {"HF_HUB_OFFLINE": "1", "EMBED_LOG_LEVEL": "warning", "EMBED_MODEL": str(tmp_path)}
    with ServiceProcess("embed", env=env) as process:
        process.wait_live()
        ready = httpx.get(process.url + "/v1/health/ready")
        for _ in range(100):  # the load fails in the background; wait until it has said so
            if "failed" in ready.json()["message"]:
                break
            time.sleep(0.1)
            ready = httpx.get(process.url + "/v1/health/ready")
        assert ready.status_code == 503
        assert ready.json()["ready"] is False
        error = error_of(httpx.post(process.url + "/v1/embeddings", json={"input": "x"}), 503)
        assert "not ready" in error["message"]
