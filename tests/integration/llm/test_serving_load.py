"""Many concurrent streams, and clients that go away: the engine must keep up and free what they held."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.integration.llm.conftest import read_metrics
from tests.support.processes import ServiceProcess

TOPICS = ["the sea", "a cat", "winter", "bread", "trains", "music", "the moon", "gardens"]


async def stream_chat(http: httpx.AsyncClient, topic: str) -> str:
    body = {"messages": [{"role": "user", "content": f"Write one sentence about {topic}."}], "max_tokens": 12,
            "temperature": 0, "stream": True}
    pieces = []
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:])["choices"]
                pieces.extend(c["delta"].get("content") or "" for c in choices)
    return "".join(pieces)


def test_64_concurrent_streams_complete_with_the_answers_sent_alone(llm_server: ServiceProcess) -> None:
    async def run() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(base_url=llm_server.url, timeout=300) as http:
            alone = [await stream_chat(http, topic) for topic in TOPICS]
            together = await asyncio.gather(*(stream_chat(http, TOPICS[i % len(TOPICS)]) for i in range(64)))
        return alone, list(together)

    alone, together = asyncio.run(run())
    assert all(alone)
    assert together == [alone[i % len(TOPICS)] for i in range(64)]


def wait_until_idle(url: str, timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        metrics = read_metrics(url)
        idle = metrics["llm:num_requests_running"] == 0 and metrics["llm:kv_cache_usage_perc"] == 0
        if idle or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def long_request(stream: bool) -> dict:
    return {"prompt": "Tell me a long story about a dragon.", "max_tokens": 900, "ignore_eos": True,
            "stream": stream}


def test_disconnect_mid_stream_aborts_and_frees_kv(llm_server: ServiceProcess) -> None:
    assert wait_until_idle(llm_server.url, 30)["llm:num_requests_running"] == 0
    with httpx.Client(base_url=llm_server.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=long_request(True)) as response:
        received = 0
        for line in response.iter_lines():
            received += line.startswith("data: ")
            if received == 3:
                # Read while still connected: leaving the loop closes the stream, and the server aborts at once.
                busy = read_metrics(llm_server.url)
                break
    assert busy["llm:num_requests_running"] == 1 and busy["llm:kv_cache_usage_perc"] > 0, busy
    assert busy["llm:kv_cache_blocks_in_use"] > 0, busy
    after = wait_until_idle(llm_server.url, 1.0)
    assert after["llm:num_requests_running"] == 0
    assert after["llm:kv_cache_usage_perc"] == 0 and after["llm:kv_cache_blocks_in_use"] == 0


def test_disconnect_while_waiting_for_a_whole_answer_aborts(llm_server: ServiceProcess) -> None:
    assert wait_until_idle(llm_server.url, 30)["llm:num_requests_running"] == 0
    try:
        httpx.post(llm_server.url + "/v1/completions", json=long_request(False), timeout=1.5)
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("a 900-token answer should not come back within 1.5 s")
    after = wait_until_idle(llm_server.url, 1.0)
    assert after["llm:num_requests_running"] == 0
    assert after["llm:kv_cache_usage_perc"] == 0
    assert 'llm:request_success_total{finished_reason="abort"}' in httpx.get(llm_server.url + "/metrics").text


def test_metrics_count_tokens_and_latencies(llm_server: ServiceProcess) -> None:
    httpx.post(llm_server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    text = httpx.get(llm_server.url + "/metrics").text
    for name in ("llm:prompt_tokens_total", "llm:generation_tokens_total", "llm:prefix_cache_queries_total",
                 "llm:prefix_cache_hits_total", "llm:num_preemptions_total", "llm:num_requests_waiting",
                 "llm:time_to_first_token_seconds_count", "llm:inter_token_latency_seconds_count",
                 "llm:e2e_request_latency_seconds_count", "llm:request_queue_time_seconds_count"):
        assert name in text
    metrics = read_metrics(llm_server.url)
    assert metrics["llm:generation_tokens_total"] >= 3
    assert metrics["llm:time_to_first_token_seconds_count"] >= 1
    assert 'llm:request_success_total{finished_reason="length"}' in text
