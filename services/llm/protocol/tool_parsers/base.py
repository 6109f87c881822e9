"""What every tool-call parser shares: a streaming scanner over the model's text that separates plain content
from calls written as `{"name": ..., "arguments": {...}}` JSON objects, optionally between begin/end markers.

The same scanner serves streaming and whole answers (a whole answer is one push), so the concatenated
argument deltas of a stream are exactly the arguments of the same answer unstreamed. Arguments are the
model's own JSON text of the arguments object, emitted as it grows.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

ARGUMENT_KEYS = ("arguments", "parameters")
# A call's start, up to where its arguments begin (once their first character is there, so no whitespace leads them).
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\S)')


@dataclass(slots=True)
class ContentDelta:
    text: str


@dataclass(slots=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(slots=True)
class ArgumentsDelta:
    index: int
    text: str


Event = ContentDelta | CallStart | ArgumentsDelta


@dataclass(slots=True)
class ToolCallFormat:
    """How a chat-template family writes a call. `begin` None: a call is an answer that starts with `{`."""

    begin: str | None
    end: str | None
    arguments_key: str = "arguments"
    separator: str = "\n"
    parallel: bool = True  # the template writes (and reads back) several calls in one turn


class JsonValueScanner:
    """Follows one JSON value character by character and says where it ends."""

    __slots__ = ("depth", "escape", "in_string", "started")

    def __init__(self) -> None:
        self.depth, self.in_string, self.escape, self.started = 0, False, False, False

    def feed(self, text: str) -> int | None:
        """Index in `text` just past the end of the value, or None if it has not ended yet."""
        for i, char in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif char == "\\":
                    self.escape = True
                elif char == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
                continue
            if char.isspace() and not self.started:
                continue
            self.started = True
            if char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
            elif self.depth == 0 and char in ",}] \n":
                return i
        return None


@dataclass(slots=True)
class _Call:
    index: int
    body: str = ""
    scanner: JsonValueScanner = field(default_factory=JsonValueScanner)
    header_end: int | None = None  # where the arguments value starts in body, once the name is known
    arguments: JsonValueScanner = field(default_factory=JsonValueScanner)
    arguments_sent: int = 0  # characters of body already sent as arguments
    arguments_done: bool = False
    started: bool = False


class ToolCallStream:
    """Turns the model's text, pushed as it comes, into content and tool-call events."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.fmt = fmt
        self.pending = ""  # text not yet classified
        self.call: _Call | None = None
        self.calls = 0
        self.after_call = False  # a call ended: the end marker and separators may follow
        self.seen_text = False

    def push(self, text: str) -> list[Event]:
        self.pending += text
        return self._advance(final=False)

    def finish(self) -> list[Event]:
        return self._advance(final=True)

    # ---- internals ----------------------------------------------------------------------------------

    def _advance(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            before = (self.pending, self.call is not None)
            if self.call is not None:
                events += self._in_call(final)
            else:
                events += self._outside(final)
            if (self.pending, self.call is not None) == before:
                return events

    def _outside(self, final: bool) -> list[Event]:
        fmt, text = self.fmt, self.pending
        if self.after_call:
            stripped = text.lstrip()
            for marker in (fmt.end, fmt.separator.strip()):
                if marker and stripped.startswith(marker):
                    self.pending = stripped[len(marker):]
                    return []
                if marker and marker.startswith(stripped) and stripped and not final:
                    return []  # could still become the marker
            if not stripped and not final:
                self.pending = ""
                return []
            self.after_call = False
            if stripped.startswith(fmt.begin or "{"):  # the next call: the whitespace before it is no content
                self.pending = text = stripped
        if fmt.begin is None:
            return self._outside_unmarked(final)
        at = text.find(fmt.begin)
        if at >= 0:
            self.pending = text[at + len(fmt.begin):]
            self.call = _Call(self.calls)
            return self._content(text[:at])
        keep = 0 if final else _partial_suffix(text, fmt.begin)
        self.pending = text[len(text) - keep:]
        return self._content(text[:len(text) - keep])

    def _outside_unmarked(self, final: bool) -> list[Event]:
        text = self.pending
        if not self.seen_text and (self.calls == 0 or self.fmt.parallel):
            stripped = text.lstrip()
            if not stripped and not final:
                return []
            if stripped.startswith("{"):
                self.pending = stripped
                self.call = _Call(self.calls)
                return []
        self.pending = ""
        return self._content(text)

    def _content(self, text: str) -> list[Event]:
        if not text:
            return []
        if text.strip():
            self.seen_text = True
        return [ContentDelta(text)]

    def _in_call(self, final: bool) -> list[Event]:
        call = self.call
        assert call is not None
        new, self.pending = self.pending, ""
        start = len(call.body)
        call.body += new
        ended = call.scanner.feed(new)
        events: list[Event] = []
        if ended is not None:
            self.pending = call.body[start + ended:]
            call.body = call.body[:start + ended]
        if call.header_end is None and (match := _HEADER.match(call.body)):
            call.header_end = match.end()
            events.append(CallStart(call.index, _call_id(), json.loads(f'"{match.group(1)}"')))
            call.started = True
        if call.header_end is not None and not call.arguments_done:
            begin = max(call.header_end, call.arguments_sent or call.header_end)
            chunk = call.body[begin:]
            stop = call.arguments.feed(chunk)
            if stop is not None:
                chunk, call.arguments_done = chunk[:stop], True
            if chunk:
                events.append(ArgumentsDelta(call.index, chunk))
            call.arguments_sent = begin + len(chunk)
        if ended is None and not final:
            return events
        self.call = None
        self.calls += 1
        self.after_call = True
        return events + self._close(call)

    def _close(self, call: _Call) -> list[Event]:
        """A call's JSON object ended (or the text did): whatever the stream has not sent yet."""
        if call.started:
            return []
        try:
            parsed: Any = json.loads(call.body)
        except json.JSONDecodeError:
            parsed = None
        name = parsed.get("name") if isinstance(parsed, dict) else None
        if not isinstance(name, str):
            self.calls -= 1  # not a call after all: the text was content, and what follows is too
            self.after_call = False
            return self._content((self.fmt.begin or "") + call.body)
        arguments = next((parsed[k] for k in ARGUMENT_KEYS if k in parsed), {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
        return [CallStart(call.index, _call_id(), name), ArgumentsDelta(call.index, text)]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a beginning of `marker` (held back: it may become one)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ParsedAnswer:
    """A whole answer split into content and calls (name, arguments JSON text)."""

    content: str
    calls: list[tuple[str, str]]


def collect(events: list[Event]) -> ParsedAnswer:
    content: list[str] = []
    names: dict[int, str] = {}
    arguments: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
        elif isinstance(event, CallStart):
            names[event.index] = event.name
            arguments.setdefault(event.index, [])
        else:
            arguments.setdefault(event.index, []).append(event.text)
    return ParsedAnswer("".join(content), [(names[i], "".join(arguments[i]) or "{}") for i in sorted(names)])
