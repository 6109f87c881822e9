"""Two LLM processes behind the retriever's replica pool: answers over the same sources keep to one replica.

The same RAG-shaped conversations (a fixed system prompt, numbered sources, a question), asked once with
`affinity` and once with `round_robin`, each over its own sources so neither run finds the other's prompts
cached. The prefix-cache hit rate is read from each answer's `usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.http import ServiceClient
from common.replicas import ReplicaPool, split_urls
from services.retriever.dependencies import LLMClient
from services.retriever.prompt import question_message
from services.retriever.settings import RetrieverSettings
from tests.support.processes import ServiceProcess, free_port

pytestmark = pytest.mark.anyio
SYSTEM = RetrieverSettings().system_prompt
TOPICS = ["pump", "boiler", "router", "garden", "kettle", "printer", "bicycle", "heater"]
QUESTIONS = ["What must be done, and how often?", "Which part is named first?", "Summarise it in three words."]


def sources(topic: str) -> list[str]:
    return [f"[{n}] ({topic}-manual.txt) The {topic} model {n} needs service step {n} after {n * 30} days; "
            f"check the {topic} seal, the {topic} filter and the {topic} valve, in that order." for n in range(1, 6)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def llm_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServiceProcess]]:
    logs = tmp_path_factory.mktemp("llm-replicas")
    processes = [ServiceProcess("llm", env={"HF_HUB_OFFLINE": "1", "LLM_MAX_MODEL_LEN": "2048"}, log_dir=logs)
                 for _ in range(2)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_ready(600)
        yield processes
    finally:
        for process in processes:
            process.stop()


async def ask_all(pool: ReplicaPool, topics: list[str]) -> tuple[int, int, list[int]]:
    """Every question about each topic in turn; (cached prompt tokens, prompt tokens, replica of each answer)."""
    llm = LLMClient(pool)
    await llm.models.model()  # asked once, before counting which replica each answer used
    cached = total = 0
    replicas = []
    for topic in topics:
        for question in QUESTIONS:
            messages = [{"role": "system", "content": SYSTEM},
                        {"role": "user", "content": question_message(sources(topic), question, "")}]
            before = list(pool.served)
            reply = await llm.chat({"messages": messages, "max_tokens": 1, "temperature": 0}, affinity=topic)
            replicas.append(next(i for i, (a, b) in enumerate(zip(before, pool.served, strict=True)) if b > a))
            usage = reply["usage"]
            cached += usage["prompt_tokens_details"]["cached_tokens"]
            total += usage["prompt_tokens"]
    await pool.aclose()
    return cached, total, replicas


async def test_affinity_keeps_shared_sources_on_one_replica_and_hits_its_cache(
        llm_replicas: list[ServiceProcess]) -> None:
    urls = [p.url for p in llm_replicas]
    warm = ReplicaPool("llm", urls, balance="round_robin")
    for _ in urls:  # the system prompt is cached everywhere before either run: only the sources differ
        await LLMClient(warm).chat({"messages": [{"role": "system", "content": SYSTEM},
                                                 {"role": "user", "content": "hello"}], "max_tokens": 1})
    await warm.aclose()
    rr_cached, rr_total, rr_replicas = await ask_all(ReplicaPool("llm", urls, balance="round_robin"), TOPICS[:4])
    af_cached, af_total, af_replicas = await ask_all(ReplicaPool("llm", urls, balance="affinity"), TOPICS[4:])
    rr_rate, af_rate = rr_cached / rr_total, af_cached / af_total
    print(f"prefix-cache hit rate: affinity {af_rate:.3f}, round-robin {rr_rate:.3f}")
    n = len(QUESTIONS)
    for start in range(0, len(af_replicas), n):  # each topic's questions all went to one replica
        assert len(set(af_replicas[start:start + n])) == 1
    assert len(set(rr_replicas)) == 2
    # Round-robin meets each topic's sources on both replicas, so it misses them twice; affinity once.
    assert af_rate > rr_rate + 0.15, (af_rate, rr_rate)


async def test_a_replica_that_refuses_connections_is_skipped(llm_replicas: list[ServiceProcess]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    pool = ReplicaPool("llm", [dead, llm_replicas[0].url])
    try:
        for topic in TOPICS:  # whichever replica the key prefers, the live one answers
            reply = await LLMClient(pool).chat({"messages": [{"role": "user", "content": topic}], "max_tokens": 1},
                                               affinity=topic)
            assert reply["choices"][0]["finish_reason"] in ("length", "stop")
    finally:
        await pool.aclose()


def test_pool_orders() -> None:
    pool = ReplicaPool("x", split_urls("http://a:1, http://b:1,http://c:1"))
    assert [r.base_url for r in pool.replicas] == ["http://a:1", "http://b:1", "http://c:1"]
    assert pool.order("topic") == pool.order("topic")  # a key always maps to the same replica
    assert {pool.order(f"key{i}")[0] for i in range(60)} == {0, 1, 2}  # and keys spread over all
    pool.in_flight[:] = [2, 0, 1]
    assert pool.order()[0] == 1  # no key: the least busy
    pool.in_flight[:] = [0, 0, 0]
    pool.served[:] = [5, 3, 4]
    assert pool.order() == [1, 2, 0]
    turns = ReplicaPool("x", ["http://a:1", "http://b:1"], balance="round_robin")
    assert [turns.order("same")[0] for _ in range(4)] == [0, 1, 0, 1]
    single = ReplicaPool("x", split_urls("http://a:1"))
    assert single.replicas[0].name == "x" and isinstance(single.replicas[0], ServiceClient)
    with pytest.raises(ValueError):
        split_urls(" , ")
