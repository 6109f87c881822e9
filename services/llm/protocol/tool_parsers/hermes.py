"""Qwen2.5 (and Hermes-style) templates: each call is `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`,
several in one turn allowed; the template renders the tools, the calls and the `tool` results itself."""

from __future__ import annotations

from services.llm.protocol.tool_parsers.base import ToolCallFormat
from services.llm.protocol.tool_parsers.family import ToolCallFamily


class HermesToolCalls(ToolCallFamily):
    name = "hermes"
    format = ToolCallFormat(begin="<tool_call>", end="</tool_call>", arguments_key="arguments", separator="\n",
                            parallel=True)

    @classmethod
    def matches(cls, template: str) -> bool:
        return "<tool_call>" in template and "</tool_call>" in template
