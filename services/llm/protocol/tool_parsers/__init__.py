"""Tool-call parsers, one per chat-template family, picked from the model's chat template:
Qwen2.5 / Hermes `<tool_call>` blocks (hermes.py), Llama 3.x JSON calls (llama3.py), and a fallback that
learns what it can from the template itself (template.py)."""

from __future__ import annotations

from typing import Any

from services.llm.protocol.tool_parsers.base import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Event,
    ParsedAnswer,
    ToolCallStream,
    collect,
)
from services.llm.protocol.tool_parsers.family import ToolCallFamily
from services.llm.protocol.tool_parsers.hermes import HermesToolCalls
from services.llm.protocol.tool_parsers.llama3 import Llama3JsonToolCalls
from services.llm.protocol.tool_parsers.template import TemplateToolCalls

FAMILIES: dict[str, type[ToolCallFamily]] = {"hermes": HermesToolCalls, "llama3_json": Llama3JsonToolCalls}


def tool_call_family(tokenizer: Any, choice: str = "auto") -> ToolCallFamily:
    """The family for this tokenizer's chat template: `choice` by name, or recognised from the template."""
    if choice in FAMILIES:
        return FAMILIES[choice]()
    if choice == "template":
        return TemplateToolCalls(tokenizer)
    if choice != "auto":
        raise ValueError(f"unknown tool-call parser {choice!r}; one of auto, template, {', '.join(FAMILIES)}")
    template = tokenizer.chat_template
    text = " ".join(template.values()) if isinstance(template, dict) else str(template or "")
    for family in FAMILIES.values():
        if family.matches(text):
            return family()
    return TemplateToolCalls(tokenizer)


__all__ = ["FAMILIES", "ArgumentsDelta", "CallStart", "ContentDelta", "Event", "ParsedAnswer", "ToolCallFamily",
           "ToolCallStream", "collect", "tool_call_family"]
