"""Tool calling for one chat request: what the chat template gets, what the grammar forces, and how each answer's
text becomes content and `tool_calls` (whole, or as OpenAI stream deltas).

`tool_choice`: "none" renders no tools and parses nothing; "auto" (the default with tools) renders them and
parses whatever calls the model writes; "required" and a named function also force calls with a grammar (the
family's structural tag), so the arguments always follow the function's parameter schema. Several calls in one
answer only where the family's template writes them (`parallel_tool_calls: true` elsewhere is a 400).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from common.errors import bad_request
from common.schemas.openai import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    FunctionCall,
    FunctionCallDelta,
    NamedToolChoice,
    ToolCall,
    ToolCallDelta,
)
from services.llm.guided import GuidedDecoding
from services.llm.protocol.tool_parsers import (
    ArgumentsDelta,
    CallStart,
    ContentDelta,
    Event,
    ToolCallFamily,
    ToolCallStream,
)

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(slots=True)
class ToolPlan:
    """How one chat request is run: the conversation and tools for the template, the constraint forcing calls
    (None unless required/named), and whether answers are parsed for calls."""

    conversation: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None
    guided: GuidedDecoding | None
    parse: bool
    parallel: bool


def plan_tools(body: ChatCompletionRequest, family: ToolCallFamily) -> ToolPlan:
    conversation = [template_message(m) for m in body.messages]
    tools = body.tools or []
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not tools and choice != "none":
        raise bad_request("tool_choice needs tools", "tool_choice")
    if body.parallel_tool_calls and tools and not family.format.parallel:
        raise bad_request(f"this model's chat template ({family.name}) writes one tool call per answer; "
                          "parallel_tool_calls must be false", "parallel_tool_calls")
    parallel = family.format.parallel if body.parallel_tool_calls is None else body.parallel_tool_calls
    if choice == "none":
        turns, _ = family.prepare(conversation, None)
        return ToolPlan(turns, None, None, parse=False, parallel=False)
    functions = [(t.function.name, t.function.parameters or EMPTY_PARAMETERS) for t in tools]
    guided = None
    if isinstance(choice, NamedToolChoice):
        named = [f for f in functions if f[0] == choice.function.name]
        if not named:
            raise bad_request(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                              "tool_choice")
        guided = GuidedDecoding.structural_tag(family.structural_tag(named, parallel=False))
    elif choice == "required":
        guided = GuidedDecoding.structural_tag(family.structural_tag(functions, parallel=parallel))
    turns, template_tools = family.prepare(conversation, [t.model_dump(exclude_none=True) for t in tools])
    return ToolPlan(turns, template_tools, guided, parse=True, parallel=parallel)


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it: calls' arguments as objects (templates write them with `tojson`)."""
    turn: dict[str, Any] = {"role": message.role, "content": message.text}
    if message.tool_calls:
        turn["tool_calls"] = [{"id": c.id, "type": "function",
                               "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                              for c in message.tool_calls]
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        turn["name"] = message.name
    return turn


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class AnswerToolCalls:
    """One answer's text, pushed as it comes, split into content and tool calls."""

    def __init__(self, family: ToolCallFamily, parallel: bool) -> None:
        self.stream: ToolCallStream = family.stream()
        self.parallel = parallel
        self.content: list[str] = []
        self.calls: dict[int, list[str]] = {}  # index -> [id, name, arguments...]

    @property
    def called(self) -> bool:
        return bool(self.calls)

    def push(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        """The content and call deltas this text adds (`final`: the answer ended, flush what is held back)."""
        events = self.stream.push(text) if text else []
        if final:
            events += self.stream.finish()
        return self._deltas(events)

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if reason == "stop" and self.called else reason

    def message(self) -> AssistantMessage:
        """The whole answer as an assistant message (after the last push)."""
        calls = [ToolCall(id=parts[0], function=FunctionCall(name=parts[1], arguments="".join(parts[2:]) or "{}"))
                 for _, parts in sorted(self.calls.items())]
        content = "".join(self.content)
        return AssistantMessage(content=content if content or not calls else None, tool_calls=calls or None)

    def _deltas(self, events: list[Event]) -> tuple[str, list[ToolCallDelta]]:
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        for event in events:
            if isinstance(event, ContentDelta):
                content.append(event.text)
                continue
            if event.index > 0 and not self.parallel:
                continue  # one call per answer was asked for: later ones are dropped
            if isinstance(event, CallStart):
                self.calls[event.index] = [event.id, event.name]
                deltas.append(ToolCallDelta(index=event.index, id=event.id, type="function",
                                            function=FunctionCallDelta(name=event.name, arguments="")))
            elif isinstance(event, ArgumentsDelta) and event.index in self.calls:
                self.calls[event.index].append(event.text)
                if deltas and deltas[-1].index == event.index:
                    last = deltas[-1].function
                    last.arguments = (last.arguments or "") + event.text
                else:
                    deltas.append(ToolCallDelta(index=event.index, function=FunctionCallDelta(arguments=event.text)))
        text = "".join(content)
        self.content.append(text)
        return text, deltas


class PlainAnswer:
    """An answer of a request without tools: all of it is content (AnswerToolCalls' interface)."""

    def __init__(self) -> None:
        self.content: list[str] = []

    def push(self, text: str, final: bool) -> tuple[str, list[ToolCallDelta]]:
        self.content.append(text)
        return text, []

    def finish_reason(self, reason: str | None) -> str | None:
        return reason

    def message(self) -> AssistantMessage:
        return AssistantMessage(content="".join(self.content))


def answer_parsers(plan: ToolPlan, family: ToolCallFamily, n: int) -> list[AnswerToolCalls | PlainAnswer]:
    """One parser per answer (choice) of a request."""
    return [AnswerToolCalls(family, plan.parallel) if plan.parse else PlainAnswer() for _ in range(n)]
