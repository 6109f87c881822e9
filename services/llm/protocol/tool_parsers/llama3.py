"""Llama 3.1 / 3.2 / 3.3 templates: a call is the whole answer, one JSON object
`{"name": ..., "parameters": {...}}` (after the `<|python_tag|>` special token, which decoding drops); one call
per turn, which is what the template renders back."""

from __future__ import annotations

from services.llm.protocol.tool_parsers.base import ToolCallFormat
from services.llm.protocol.tool_parsers.family import ToolCallFamily


class Llama3JsonToolCalls(ToolCallFamily):
    name = "llama3_json"
    format = ToolCallFormat(begin=None, end=None, arguments_key="parameters", separator="; ", parallel=False)

    @classmethod
    def matches(cls, template: str) -> bool:
        return "<|start_header_id|>" in template and ('"parameters"' in template or "ipython" in template)
