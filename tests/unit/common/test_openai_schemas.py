"""The OpenAI request schemas on their own: a field we do not implement is refused by name, never ignored."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.schemas.openai import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(("extra", "field"), [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"tools": [TOOL]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "weather"}]}, "functions"),
    ({"function_call": {"name": "weather"}}, "function_call"),
    ({"logit_bias": {"42": -100}}, "logit_bias"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"guided_json": {"type": "object"}}, "guided_json"),  # vLLM's structured-output extras are not ours either
    ({"made_up_knob": 1}, "made_up_knob"),
])
def test_chat_field_we_do_not_honour_is_refused_by_name(extra: dict, field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({"messages": MESSAGES, **extra})
    [error] = refused.value.errors()
    assert error["type"] == "extra_forbidden" and error["loc"] == (field,)


def test_message_fields_we_do_not_honour_are_refused() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({"messages": [{"role": "assistant", "content": None,
                                                            "tool_calls": [call]}, *MESSAGES]})
    assert refused.value.errors()[0]["loc"] == ("messages", 0, "tool_calls")


@pytest.mark.parametrize(("extra", "field"), [({"suffix": "The end."}, "suffix"), ({"best_of": 3}, "best_of"),
                                              ({"logit_bias": {"7": 5}}, "logit_bias")])
def test_completion_field_we_do_not_honour_is_refused_by_name(extra: dict, field: str) -> None:
    with pytest.raises(ValidationError) as refused:
        CompletionRequest.model_validate({"prompt": "Hi", **extra})
    assert refused.value.errors()[0]["loc"] == (field,)


def test_values_that_ask_for_nothing_are_accepted() -> None:
    neutral = {"response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "functions": None,
               "logit_bias": {}, "parallel_tool_calls": False, "store": False, "seed": None, "user": "u-1"}
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Hi",
                                                                  "tool_calls": []}], **neutral})
    assert request.messages[0].text == "Hi" and request.seed is None and request.user == "u-1"
    assert CompletionRequest.model_validate({"prompt": "Hi", "best_of": 1, "suffix": None}).prompts == ["Hi"]
