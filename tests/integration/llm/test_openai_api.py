"""The LLM server through the official OpenAI client and NVIDIA's LangChain client, on a real process."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.support.processes import ServiceProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(llm_server: ServiceProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=llm_server.url + "/v1", api_key="unused", max_retries=0)


def test_models_card_names_the_model_and_context(llm_server: ServiceProcess, client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert models[0].model_extra["max_model_len"] == 1024
    assert 130e6 < models[0].model_extra["parameters"] < 140e6  # SmolLM2-135M: the retriever sizes prompts by it
    assert models[0].model_extra["gguf_blocks"] == {}  # CPU: the Q4_1 GGUF is dequantized at load (auto)
    hardware = models[0].model_extra["hardware"]
    assert hardware["profile"] == "cpu-fp32-torch"
    assert hardware["kv_block_size"] == 16 and hardware["cuda_graphs"] is False


def test_chat_completion_answers_and_counts_tokens(client: openai.OpenAI, model_id: str) -> None:
    reply = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=24, temperature=0)
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_equals_non_stream(client: openai.OpenAI, model_id: str) -> None:
    whole = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_sync_and_stream_agree(client: openai.OpenAI, model_id: str) -> None:
    prompt = "The three primary colors are"
    whole = client.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0)
    stream = client.completions.create(model=model_id, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12


def test_async_client_both_endpoints(llm_server: ServiceProcess, model_id: str) -> None:
    async def ask() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=llm_server.url + "/v1", api_key="unused", max_retries=0)
        chat = await client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=16, temperature=0)
        pieces = []
        async for chunk in await client.completions.create(model=model_id, prompt="One, two, three,",
                                                           max_tokens=8, temperature=0, stream=True):
            pieces.append(chunk.choices[0].text)
        await client.close()
        return chat.choices[0].message.content, "".join(pieces)

    chat_text, completion_text = asyncio.run(ask())
    assert "Paris" in chat_text
    assert completion_text.strip()


def test_stop_string_cuts_the_answer(client: openai.OpenAI, model_id: str) -> None:
    full = client.completions.create(model=model_id, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[3:6]  # a piece from inside the answer, likely spanning a token boundary
    cut = client.completions.create(model=model_id, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[stop])
    streamed = client.completions.create(model=model_id, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                         stop=stop, stream=True)
    expected = text[:text.find(stop)]
    assert cut.choices[0].text == expected
    assert cut.choices[0].finish_reason == "stop"
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_batch_prompts_token_ids_and_n(llm_server: ServiceProcess, client: openai.OpenAI, model_id: str) -> None:
    token_ids = httpx.post(llm_server.url + "/tokenize", json={"prompt": "Hello, my name is"}).json()["tokens"]
    reply = client.completions.create(model=model_id, prompt=["Hello, my name is", "The sky is"], max_tokens=6,
                                      temperature=0)
    by_ids = client.completions.create(model=model_id, prompt=token_ids, max_tokens=6, temperature=0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert by_ids.choices[0].text == reply.choices[0].text
    several = client.completions.create(model=model_id, prompt="Once upon a time", max_tokens=6, n=3,
                                        temperature=1.0, seed=1)
    assert sorted(c.index for c in several.choices) == [0, 1, 2]
    assert several.usage.completion_tokens == 18


def test_logprobs_for_both_endpoints(client: openai.OpenAI, model_id: str) -> None:
    completion = client.completions.create(model=model_id, prompt="The sky is", max_tokens=4, temperature=0,
                                           logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == 4 and all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    chat = client.chat.completions.create(model=model_id, messages=QUESTION, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert content[0].top_logprobs[0].logprob >= content[0].top_logprobs[1].logprob


def test_max_tokens_omitted_uses_rest_of_context(client: openai.OpenAI, model_id: str) -> None:
    reply = client.chat.completions.create(model=model_id, messages=QUESTION, temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert 0 < reply.usage.completion_tokens < 1024


def test_prefix_cache_reports_cached_tokens(client: openai.OpenAI, model_id: str) -> None:
    system = {"role": "system", "content": "You are a terse assistant. " * 12}
    messages = [system, {"role": "user", "content": "Name a color."}]
    client.chat.completions.create(model=model_id, messages=messages, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model=model_id, messages=messages, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_tokenize_and_detokenize_round_trip(llm_server: ServiceProcess) -> None:
    tokens = httpx.post(llm_server.url + "/tokenize", json={"prompt": "Grüße, 東京!"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
    text = httpx.post(llm_server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text == {"prompt": "Grüße, 東京!"}
    chat = httpx.post(llm_server.url + "/tokenize", json={"messages": QUESTION}).json()
    assert chat["count"] > tokens["count"]


def test_langchain_chat_nvidia_invoke_and_stream(llm_server: ServiceProcess, model_id: str) -> None:
    from langchain_nvidia_ai_endpoints import ChatNVIDIA

    llm = ChatNVIDIA(base_url=llm_server.url + "/v1", model=model_id, api_key="unused", temperature=0,
                     max_tokens=24)
    answer = llm.invoke("What is the capital of France?")
    assert "Paris" in answer.content
    streamed = "".join(chunk.content for chunk in llm.stream("What is the capital of France?"))
    assert streamed == answer.content
