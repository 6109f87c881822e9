"""The fallback for chat templates of no known family, driven by what the template itself does.

At start-up it renders probe conversations through the template to learn: whether it renders the tool
definitions, how it writes an assistant's call (the text around the call's JSON becomes the begin/end markers
the parser looks for, and the key it uses for the arguments), and whether it accepts the `tool` role. What the
template cannot do is done in the conversation instead: the tool definitions and the calling convention go into
the system message, past calls become the assistant's text, and tool results become user turns.
SmolLM2's template (the bundled model) knows none of this and gets all three.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from services.llm.protocol.tool_parsers.base import ARGUMENT_KEYS, JsonValueScanner, ToolCallFormat
from services.llm.protocol.tool_parsers.family import ToolCallFamily

log = logging.getLogger(__name__)

DEFAULT_FORMAT = ToolCallFormat(begin="<tool_call>", end="</tool_call>", arguments_key="arguments", separator="\n",
                                parallel=True)
PROBE_NAME = "probe_function_x7"
PROBE_RESULT = "probe result 41"
INSTRUCTIONS = ("You can call functions to help answer. The functions, one JSON signature per line:\n<tools>\n{tools}\n"
                "</tools>\nTo call a function, answer with its name and arguments as a JSON object between "
                "<tool_call> and </tool_call>, one block per call:\n<tool_call>\n"
                '{{"name": "<function name>", "arguments": {{<arguments>}}}}\n</tool_call>')


class TemplateToolCalls(ToolCallFamily):
    name = "template"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        user = {"role": "user", "content": "probe question"}
        tools = [{"type": "function", "function": {"name": PROBE_NAME, "description": "probe",
                                                   "parameters": {"type": "object", "properties": {}}}}]
        with_tools = self._render([user], tools, add_generation_prompt=True)
        self.renders_tools = with_tools is not None and PROBE_NAME in with_tools
        self.format, self.renders_calls = self._call_format(user, tools, with_tools)
        answered = self._render([user, {"role": "assistant", "content": "probe answer"},
                                 {"role": "tool", "tool_call_id": "call_probe", "content": PROBE_RESULT}],
                                None, add_generation_prompt=True)
        self.accepts_tool_role = answered is not None and PROBE_RESULT in answered
        log.info("chat template tool support: tools %s, calls %s (%r ... %r), tool role %s",
                 "rendered" if self.renders_tools else "in the system message",
                 "rendered" if self.renders_calls else "as text", self.format.begin, self.format.end,
                 "accepted" if self.accepts_tool_role else "as user turns")

    @classmethod
    def matches(cls, template: str) -> bool:
        return True

    def prepare(self, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        turns = []
        for message in conversation:
            if message["role"] == "assistant" and message.get("tool_calls") and not self.renders_calls:
                calls = "\n".join(self.call_text(c["function"]["name"], c["function"]["arguments"])
                                  for c in message["tool_calls"])
                message = {"role": "assistant", "content": "\n".join(filter(None, [message.get("content"), calls]))}
            elif message["role"] == "tool" and not self.accepts_tool_role:
                message = {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n"
                                                      "</tool_response>"}
            turns.append(message)
        if not tools or self.renders_tools:
            return turns, tools
        signatures = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
        instructions = INSTRUCTIONS.format(tools=signatures)
        if turns and turns[0]["role"] == "system":
            turns[0] = {**turns[0], "content": f"{turns[0].get('content') or ''}\n\n{instructions}".lstrip()}
        else:
            turns.insert(0, {"role": "system", "content": instructions})
        return turns, None

    # ---- probing ------------------------------------------------------------------------------------

    def _render(self, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                add_generation_prompt: bool) -> str | None:
        try:
            return str(self.tokenizer.apply_chat_template(conversation, tools=tools, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt))
        except Exception:  # a template that refuses the probe simply lacks that feature
            return None

    def _call_format(self, user: dict[str, Any], tools: list[dict[str, Any]], prefix: str | None
                     ) -> tuple[ToolCallFormat, bool]:
        call = {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_probe", "type": "function", "function": {"name": PROBE_NAME, "arguments": {"k": 1}}}]}
        full = self._render([user, call], tools, add_generation_prompt=False)
        if prefix is None or full is None or not full.startswith(prefix):
            return DEFAULT_FORMAT, False
        turn = full[len(prefix):]
        found = re.search(r'\{\s*"name"\s*:\s*"' + PROBE_NAME + '"', turn)
        if found is None:
            return DEFAULT_FORMAT, False
        length = JsonValueScanner().feed(turn[found.start():])
        if length is None:
            return DEFAULT_FORMAT, False
        body = json.loads(turn[found.start():found.start() + length])
        key = next((k for k in ARGUMENT_KEYS if k in body), None)
        tail = turn[found.start() + length:]
        for special in sorted(getattr(self.tokenizer, "all_special_tokens", []), key=len, reverse=True):
            tail = tail.split(special)[0] if special else tail
        begin, end = turn[:found.start()].strip() or None, tail.strip() or None
        if key is None or (begin is not None and any(s in begin for s in ("\n\n",))):
            return DEFAULT_FORMAT, False
        return ToolCallFormat(begin=begin, end=end, arguments_key=key, separator="\n", parallel=begin is not None), True
