"""A server with tiny limits and an API key: queue full is 429, slow requests time out, no key is 401, and a KV pool
smaller than the model's context clamps the context."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.support.processes import ServiceProcess

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"prompt": "Tell me a long story.", "max_tokens": 900, "ignore_eos": True}


@pytest.fixture(scope="module")
def limited_server() -> Iterator[ServiceProcess]:
    env = {"HF_HUB_OFFLINE": "1", "API_KEY": KEY, "LLM_MAX_NUM_SEQS": "1", "LLM_MAX_WAITING": "1",
           "LLM_REQUEST_TIMEOUT": "8", "LLM_KV_CACHE_GIB": "0.05"}  # a pool smaller than SmolLM2's 8192 positions
    with ServiceProcess("llm", env=env) as server:
        yield server.wait_ready()


def test_missing_or_wrong_key_is_401_but_health_is_open(limited_server: ServiceProcess) -> None:
    url = limited_server.url
    assert httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 401
    wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["message"] == "invalid API key"
    assert httpx.get(url + "/v1/health/ready").status_code == 200
    assert httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=AUTH,
                      timeout=60).status_code == 200


def test_full_queue_answers_429_at_once(limited_server: ServiceProcess) -> None:
    with httpx.Client(base_url=limited_server.url, headers=AUTH, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as running, \
            http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as waiting:
        assert running.status_code == waiting.status_code == 200
        refused = httpx.post(limited_server.url + "/v1/completions", json=LONG, headers=AUTH, timeout=10)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        assert refused.headers["retry-after"] == "1"


def test_request_over_the_timeout_is_aborted_with_503(limited_server: ServiceProcess) -> None:
    response = httpx.post(limited_server.url + "/v1/completions", json=LONG, headers=AUTH, timeout=120)
    assert response.status_code == 503
    assert "timed out after 8s" in response.json()["error"]["message"]
    after = httpx.post(limited_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2},
                       headers=AUTH, timeout=60)
    assert after.status_code == 200


def test_a_small_pool_clamps_the_context_and_the_default_max_tokens_fits(limited_server: ServiceProcess) -> None:
    url = limited_server.url
    context = httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["max_model_len"]
    assert len(LONG["prompt"]) + LONG["max_tokens"] < context < 8192
    # No max_tokens: the rest of the clamped context, which the pool can hold, so tokens flow.
    body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as http, \
            http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        events = (json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {"))
        assert next(events)["choices"][0]["delta"]["role"] == "assistant"
        answer = next(events)
        assert "error" not in answer and answer["choices"][0]["delta"]["content"], answer
    over = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": context}, headers=AUTH, timeout=30)
    assert over.status_code == 400 and str(context) in over.json()["error"]["message"]
