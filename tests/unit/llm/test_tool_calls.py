"""Tool calling without HTTP: each chat-template family's parser (whole answers and streams agree), the plan a
request gets (what the template sees, what the grammar forces, which requests are 400s), and forced calls run
through the engine on a random-weight model, whose arguments always follow the function's parameter schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from common.errors import APIError
from common.schemas.openai import ChatCompletionRequest
from services.llm.engine import LLMEngine, SamplingParams
from services.llm.protocol.tool_parsers import (
    FAMILIES,
    HermesToolCalls,
    Llama3JsonToolCalls,
    TemplateToolCalls,
    ToolCallFamily,
    tool_call_family,
)
from services.llm.protocol.tools import AnswerToolCalls, plan_tools

from .test_engine_greedy import assert_no_leaks

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "integer", "minimum": -12,
                                                                                  "maximum": 14}},
                                       "required": ["zone"], "additionalProperties": False}}}
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]

# A Hermes-style template (the shape of Qwen2.5's): tools in the system turn, calls in <tool_call> blocks,
# tool results in <tool_response> blocks of a user turn.
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>\n"
    "For each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n"
    "</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}\n<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": QUESTION, **fields})


def parse(family: ToolCallFamily, text: str, pieces: int = 1) -> tuple[str | None, list[tuple[str, str]], list]:
    """The message from `text` pushed in `pieces` parts of equal size, and the stream's call deltas."""
    answer = AnswerToolCalls(family, parallel=True)
    size = max(1, -(-len(text) // pieces))
    deltas = []
    chunks = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    for i, chunk in enumerate(chunks):
        deltas += answer.push(chunk, final=i == len(chunks) - 1)[1]
    message = answer.message()
    return message.content, [(c.function.name, c.function.arguments) for c in message.tool_calls or []], deltas


@pytest.fixture(scope="module")
def smol_tokenizer(smol_tiny: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_tiny))


def families(tokenizer: Any) -> dict[str, ToolCallFamily]:
    return {"hermes": HermesToolCalls(), "llama3_json": Llama3JsonToolCalls(), "template": TemplateToolCalls(tokenizer)}


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "template"])
def test_calls_parse_the_same_whole_and_streamed(smol_tokenizer: Any, name: str) -> None:
    family = families(smol_tokenizer)[name]
    arguments = {"city": "Paris \"centre\"", "unit": "celsius", "nested": {"a": [1, {"b": "}"}]}}
    text = family.call_text("get_weather", arguments)
    for pieces in (1, 3, len(text)):
        content, calls, deltas = parse(family, text, pieces)
        assert content is None
        assert [(n, json.loads(a)) for n, a in calls] == [("get_weather", arguments)]
        assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments or "" for d in deltas) == calls[0][1]


@pytest.mark.parametrize("name", ["hermes", "template"])
def test_text_around_calls_and_several_calls(smol_tokenizer: Any, name: str) -> None:
    family = families(smol_tokenizer)[name]
    text = ("Let me look that up.\n" + family.call_text("get_weather", {"city": "Oslo", "unit": "celsius"}) + "\n"
            + family.call_text("get_time", {"zone": 1}))
    for pieces in (1, 7, len(text)):
        content, calls, _ = parse(family, text, pieces)
        assert content is not None and content.strip() == "Let me look that up."
        assert [n for n, _ in calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("text", ["Paris is sunny today.", "Use <tool_call> tags? No: {braces} and \"quotes\".",
                                  '{"not": "a call"}', ""])
def test_plain_answers_stay_content(smol_tokenizer: Any, text: str) -> None:
    for family in families(smol_tokenizer).values():
        for pieces in (1, max(1, len(text))):
            content, calls, _ = parse(family, text, pieces)
            assert calls == [] and (content or "") == text


def test_family_is_recognised_from_the_chat_template(smol_tokenizer: Any) -> None:
    class Fake:
        chat_template = HERMES_TEMPLATE

    assert isinstance(tool_call_family(Fake()), HermesToolCalls)
    Fake.chat_template = "<|start_header_id|>ipython<|end_header_id|> {{ '\"parameters\": ' }}"
    assert isinstance(tool_call_family(Fake()), Llama3JsonToolCalls)
    assert isinstance(tool_call_family(smol_tokenizer), TemplateToolCalls)  # SmolLM2 knows no tools
    assert set(FAMILIES) == {"hermes", "llama3_json"}
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        tool_call_family(smol_tokenizer, "mistral")


def test_template_fallback_puts_tools_and_history_into_the_conversation(smol_tokenizer: Any) -> None:
    family = TemplateToolCalls(smol_tokenizer)
    assert not family.renders_tools
    body = request(tools=[WEATHER], messages=[
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                              "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}])
    plan = plan_tools(body, family)
    assert plan.template_tools is None and plan.parse and plan.guided is None
    text = smol_tokenizer.apply_chat_template(plan.conversation, tokenize=False, add_generation_prompt=True)
    assert '"name": "get_weather"' in text and "Current weather in a city" in text  # the signature
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "18 degrees and sunny" in text


def test_template_fallback_learns_a_templates_own_call_markers(smol_tokenizer: Any) -> None:
    class Custom:
        chat_template = ("{% for m in messages %}[{{ m.role }}] {{ m.content or '' }}"
                         "{% for c in m.tool_calls or [] %}[CALL]{\"name\": \"{{ c.function.name }}\", "
                         "\"arguments\": {{ c.function.arguments | tojson }}}[/CALL]{% endfor %}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
        all_special_tokens: tuple[str, ...] = ()

        def apply_chat_template(self, conversation: list, tools: Any = None, tokenize: bool = False,
                                add_generation_prompt: bool = False) -> str:
            from jinja2 import Template

            return Template(self.chat_template).render(messages=conversation, tools=tools,
                                                       add_generation_prompt=add_generation_prompt)

    family = TemplateToolCalls(Custom())
    assert family.renders_calls
    assert (family.format.begin, family.format.end) == ("[CALL]", "[/CALL]")
    content, calls, _ = parse(family, 'Sure. [CALL]{"name": "get_time", "arguments": {"zone": 3}}[/CALL]', 4)
    assert content == "Sure. " and calls == [("get_time", '{"zone": 3}')]


def test_plan_refuses_what_cannot_be_honoured(smol_tokenizer: Any) -> None:
    hermes, llama = HermesToolCalls(), Llama3JsonToolCalls()
    cases = [
        (hermes, request(tool_choice="required"), "tool_choice"),
        (hermes, request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
         "tool_choice"),
        (llama, request(tools=[WEATHER, TIME], parallel_tool_calls=True), "parallel_tool_calls"),
    ]
    for family, body, param in cases:
        with pytest.raises(APIError) as refused:
            plan_tools(body, family)
        assert refused.value.status == 400 and refused.value.param == param
    assert plan_tools(request(tools=[WEATHER], parallel_tool_calls=False), llama).parallel is False
    none = plan_tools(request(tools=[WEATHER], tool_choice="none"), hermes)
    assert none.template_tools is None and not none.parse and none.guided is None
    auto = plan_tools(request(tools=[WEATHER]), hermes)
    assert auto.template_tools == [WEATHER] and auto.parse and auto.guided is None and auto.parallel


@pytest.fixture(scope="module")
def engine(smol_tiny: Path, make_engine) -> LLMEngine:
    return make_engine(smol_tiny, block_size=16, max_model_len=1024, max_num_batched_tokens=1024)


@pytest.mark.parametrize("name", ["hermes", "llama3_json", "template"])
@pytest.mark.parametrize("choice", ["required", "required_parallel", "named"])
def test_forced_calls_follow_the_parameter_schema(engine: LLMEngine, smol_tokenizer: Any, name: str,
                                                  choice: str) -> None:
    family = families(smol_tokenizer)[name]
    tool_choice = "required" if choice != "named" else {"type": "function", "function": {"name": "get_time"}}
    parallel = choice == "required_parallel" and family.format.parallel
    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice=tool_choice, parallel_tool_calls=parallel), family)
    assert plan.guided is not None
    text = engine.tokenizer.apply_chat_template(plan.conversation, tools=plan.template_tools, tokenize=False,
                                                add_generation_prompt=True)
    prompt = engine.tokenizer.encode(text, add_special_tokens=False)
    engine.add_request("call", prompt, SamplingParams(max_tokens=300, temperature=1.0, seed=4, n=4,
                                                      guided=plan.guided))
    tokens: dict[int, list[int]] = {}
    finish: dict[int, str | None] = {}
    while engine.has_unfinished():
        for output in engine.step():
            for completion in output.outputs:
                tokens.setdefault(completion.index, []).extend(completion.new_token_ids)
                finish[completion.index] = completion.finish_reason
    assert_no_leaks(engine)
    for index, ids in tokens.items():
        answer = AnswerToolCalls(family, plan.parallel)
        answer.push(engine.tokenizer.decode(ids, skip_special_tokens=True), final=True)
        message = answer.message()
        assert message.tool_calls
        calls = message.tool_calls
        if parallel and finish[index] == "length":  # a random model may call on and on; the last call is cut
            calls = calls[:-1]
        else:
            assert finish[index] == "stop" and answer.finish_reason("stop") == "tool_calls"
            assert message.content is None
            assert parallel or len(calls) == 1
        for call in calls:
            assert choice != "named" or call.function.name == "get_time"
            jsonschema_rs.validate(PARAMETERS[call.function.name], json.loads(call.function.arguments))
