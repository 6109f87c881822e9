"""Structured outputs and tool calling on the real server (bundled SmolLM2-135M), through the clients users have:
the official `openai` client (`parse`, its tool-call loop, streamed tool-call deltas) and NVIDIA's LangChain client
(`with_structured_output`, `bind_tools`). What is asserted is what the grammar guarantees (the answer parses and
follows the schema; forced calls name a given function with valid arguments), never the small model's judgment."""

from __future__ import annotations

import json
import re
import warnings
from typing import Annotated, Literal

import httpx
import jsonschema_rs
import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.processes import ServiceProcess

WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                      "required": ["city", "unit"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                            "parameters": WEATHER_PARAMETERS, "strict": True}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


class City(BaseModel):
    # Strings are bounded: a 135M model can repeat itself inside a string until max_tokens, and a cut answer
    # is only a prefix of a valid one (the grammar guarantees form, the bounds guarantee an end).
    name: str = Field(max_length=40)
    country: str = Field(max_length=40)
    population_millions: float = Field(ge=0, le=50)
    landmarks: list[Annotated[str, Field(max_length=30)]] = Field(max_length=3)
    kind: Literal["capital", "other"]


@pytest.fixture(scope="module")
def client(llm_server: ServiceProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=llm_server.url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_what_is_supported(client: openai.OpenAI) -> None:
    capabilities = client.models.list().data[0].model_extra["capabilities"]
    assert capabilities["response_format"] == ["text", "json_object", "json_schema"]
    assert capabilities["tool_call_parser"] == "template"  # SmolLM2's template knows no tools
    assert {"echo", "best_of", "logit_bias", "tools"} <= {k for k, v in capabilities.items() if v is True}


def test_parse_with_a_pydantic_model(client: openai.OpenAI, model_id: str) -> None:
    completion = client.chat.completions.parse(
        model=model_id, messages=[{"role": "user", "content": "Describe Paris as JSON."}], response_format=City,
        max_tokens=200, temperature=0)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, City)
    assert City.model_validate_json(message.content) == message.parsed


def test_json_object_and_vllm_guided_fields(client: openai.OpenAI, model_id: str) -> None:
    def ask(max_tokens: int = 120, **extra: object) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Pick one."}],
                                              max_tokens=max_tokens, temperature=0, **extra)

    colours = ["red", "green", "blue"]
    assert ask(extra_body={"guided_choice": colours}).choices[0].message.content in colours
    assert ask(extra_body={"nvext": {"guided_choice": colours}}).choices[0].message.content in colours
    code = ask(extra_body={"structured_outputs": {"regex": r"[A-Z]{2}-\d{3}"}}).choices[0].message.content
    assert re.fullmatch(r"[A-Z]{2}-\d{3}", code)
    grammar = 'root ::= "yes" | "no"'
    assert ask(extra_body={"guided_grammar": grammar}).choices[0].message.content in ("yes", "no")
    schema = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer"]}
    reply = ask(extra_body={"guided_json": schema}).choices[0]
    jsonschema_rs.validate(schema, json.loads(reply.message.content))
    reply = ask(response_format={"type": "json_object"}, max_tokens=300).choices[0]
    if reply.finish_reason == "stop":  # an unbounded object can fill the budget; then it is a prefix
        assert isinstance(json.loads(reply.message.content), dict)
    else:
        assert reply.message.content.startswith("{")


def test_structured_stream_equals_whole(client: openai.OpenAI, model_id: str) -> None:
    args = dict(model=model_id, messages=[{"role": "user", "content": "A city, as JSON."}], max_tokens=200,
                temperature=0, response_format={"type": "json_schema", "json_schema": {
                    "name": "City", "schema": City.model_json_schema(), "strict": True}})
    whole = client.chat.completions.create(**args).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                       if c.choices)
    assert streamed == whole
    City.model_validate_json(whole)


def test_required_tool_call_and_the_tool_loop(client: openai.OpenAI, model_id: str) -> None:
    messages: list = list(ASK_WEATHER)
    first = client.chat.completions.create(model=model_id, messages=messages, tools=[WEATHER],
                                           tool_choice="required", parallel_tool_calls=False, max_tokens=120,
                                           temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema_rs.validate(WEATHER_PARAMETERS, arguments)
    # The loop: the call goes back as the assistant's turn, its result as a tool message.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, **arguments})}]
    second = client.chat.completions.create(model=model_id, messages=messages, tools=[WEATHER], tool_choice="none",
                                            max_tokens=40, temperature=0)
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content and second.choices[0].finish_reason in ("stop", "length")
    alone = client.chat.completions.create(model=model_id, messages=ASK_WEATHER, max_tokens=1, temperature=0)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 20  # the call and its result are in the prompt


def test_named_tool_choice_with_the_pydantic_helper(client: openai.OpenAI, model_id: str) -> None:
    class GetTime(BaseModel):
        """The current time in a time zone."""

        utc_offset: int = Field(ge=-12, le=14)

    tools = [openai.pydantic_function_tool(GetTime), WEATHER]
    completion = client.chat.completions.parse(model=model_id, messages=ASK_WEATHER, tools=tools,
                                               tool_choice={"type": "function", "function": {"name": "GetTime"}},
                                               max_tokens=60, temperature=0)
    [call] = completion.choices[0].message.tool_calls
    assert call.function.name == "GetTime" and isinstance(call.function.parsed_arguments, GetTime)


def test_streamed_tool_call_deltas_add_up_to_the_whole_calls(client: openai.OpenAI, model_id: str) -> None:
    """Several calls in one answer (the template fallback allows them; SmolLM2 writes two here), streamed."""
    args = dict(model=model_id, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", max_tokens=160,
                temperature=0)
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls
    for call in whole:
        jsonschema_rs.validate(WEATHER_PARAMETERS, json.loads(call.function.arguments))
    chunks = [c for c in client.chat.completions.create(**args, stream=True) if c.choices]
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    for index, call in enumerate(whole):
        mine = [d for d in deltas if d.index == index]
        assert mine[0].id and mine[0].type == "function" and mine[0].function.name == "get_weather"
        assert all(d.id is None and d.function.name is None for d in mine[1:])
        assert "".join(d.function.arguments or "" for d in mine) == call.function.arguments
    assert {d.index for d in deltas} == set(range(len(whole)))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)  # calls only, no content
    with client.chat.completions.stream(**args) as stream:  # the client's own accumulation of the deltas
        final = stream.get_final_completion()
    assert [c.function.arguments for c in final.choices[0].message.tool_calls] == \
        [c.function.arguments for c in whole]


def test_auto_tool_choice_parses_calls_the_model_writes(llm_server: ServiceProcess, model_id: str) -> None:
    """With `auto` nothing is forced, and a call written in the template's format comes back parsed. A regex
    makes the model write exactly one call block (so this tests the parsing, not the model's judgment)."""
    body = {"model": model_id, "messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 60,
            "temperature": 0, "guided_regex": r'<tool_call>\n\{"name": "get_weather", "arguments": '
                                              r'\{"city": "Paris", "unit": "celsius"\}\}\n</tool_call>'}
    reply = httpx.post(llm_server.url + "/v1/chat/completions", json=body, timeout=120).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}


def test_completions_echo_best_of_and_logit_bias(client: openai.OpenAI, model_id: str) -> None:
    prompt = "The three primary colors are"
    plain = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    echoed = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + plain
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model_id, prompt=prompt, max_tokens=6, temperature=0, echo=True, stream=True) if c.choices)
    assert streamed == prompt + plain
    best = client.completions.create(model=model_id, prompt=prompt, max_tokens=6, temperature=1.0, seed=3, n=2,
                                     best_of=4, logprobs=0, extra_body={"ignore_eos": True})
    assert len(best.choices) == 2 and best.usage.completion_tokens == 4 * 6
    sums = [sum(c.logprobs.token_logprobs) for c in best.choices]
    assert sums == sorted(sums, reverse=True)
    base = str(client.base_url).removesuffix("/v1/")
    token = httpx.post(base + "/tokenize", json={"prompt": " banana", "add_special_tokens": False}).json()["tokens"][0]
    expected = httpx.post(base + "/detokenize", json={"tokens": [token] * 3}).json()["prompt"]
    forced = client.completions.create(model=model_id, prompt=prompt, max_tokens=3, temperature=0,
                                       logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].text == expected


def test_langchain_structured_output_and_bound_tools(llm_server: ServiceProcess, model_id: str) -> None:
    from langchain_nvidia_ai_endpoints import ChatNVIDIA

    def get_weather(city: str, unit: Literal["celsius", "fahrenheit"]) -> str:
        """The current weather in a city."""
        return f"21 degrees {unit} in {city}"

    llm = ChatNVIDIA(base_url=llm_server.url + "/v1", model=model_id, api_key="unused", temperature=0,
                     max_tokens=200)
    with warnings.catch_warnings():  # "not known to support structured output / tools": it is not in NVIDIA's list
        warnings.simplefilter("ignore", UserWarning)
        structured = llm.with_structured_output(City)
        bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    city = structured.invoke("Describe Paris.")
    assert isinstance(city, City)
    message = bound.invoke("What is the weather like in Paris today?")
    [call] = message.tool_calls
    assert call["name"] == "get_weather" and call["args"]["unit"] in ("celsius", "fahrenheit")
    assert isinstance(call["args"]["city"], str)
