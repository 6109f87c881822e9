"""The interface of a chat-template family's tool calling: how it is recognised, how its calls are written
(and so parsed), and the grammar that forces a call (`tool_choice` required or named)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import Any

from services.llm.protocol.tool_parsers.base import ToolCallFormat, ToolCallStream

# Consecutive whitespace allowed inside forced arguments: a small model can otherwise fill its budget with it.
MAX_WHITESPACE = 1


class ToolCallFamily(ABC):
    """One chat-template family. Subclasses set `name` and `format`, and say which templates are theirs."""

    name = ""
    format: ToolCallFormat

    @classmethod
    @abstractmethod
    def matches(cls, template: str) -> bool:
        """Whether a chat template is written for this family's tool-call format."""

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.format)

    def prepare(self, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The conversation and tools as the chat template gets them (templates that know tools: unchanged)."""
        return conversation, tools

    def call_text(self, name: str, arguments: dict[str, Any]) -> str:
        """One call written the way this family's model writes it."""
        body = json.dumps({"name": name, self.format.arguments_key: arguments}, ensure_ascii=False)
        return f"{self.format.begin or ''}\n{body}\n{self.format.end or ''}".strip("\n") \
            if self.format.begin else body

    def structural_tag(self, functions: list[tuple[str, dict[str, Any]]], parallel: bool) -> dict[str, Any]:
        """An xgrammar structural tag: one call (or several, when `parallel`) of the given functions, with
        arguments following each function's parameter schema, and nothing else."""
        fmt = self.format
        tags = []
        for name, parameters in functions:
            head = json.dumps({"name": name})[:-1] + f', "{fmt.arguments_key}": '
            begin = f"{fmt.begin}\n{head}" if fmt.begin else head
            end = f"}}\n{fmt.end}" if fmt.end else "}"
            tags.append({"type": "tag", "begin": begin, "end": end,
                         "content": {"type": "json_schema", "json_schema": parameters,
                                     "max_whitespace_cnt": MAX_WHITESPACE}})
        return {"type": "structural_tag",
                "format": {"type": "tags_with_separator", "tags": tags, "separator": fmt.separator,
                           "at_least_one": True, "stop_after_first": not (parallel and fmt.parallel)}}
