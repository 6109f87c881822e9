"""The async serving loop over the synchronous engine, and turning token ids into streamed text.

The engine is not thread-safe, so exactly one thread (the engine thread) calls `add_request`, `step` and
`abort`; the event loop talks to it through a command list guarded by a condition, and each request gets its
outputs back on an `asyncio.Queue` fed with `loop.call_soon_threadsafe`. The engine thread sleeps on the
condition while there is nothing to do.

Text is produced per answer (choice) by an `IncrementalDetokenizer` (never emits half of a multi-byte
character) followed by a `StopStringMatcher` (stop_strings.py). A choice whose text reaches a stop string is
ended in the engine right away (`finish_by_stop_string`), while the request's other choices go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from common.errors import APIError
from common.health import Readiness
from services.llm.stop_strings import StopStringMatcher

log = logging.getLogger(__name__)

# Prompt tokens that seed the detokenizer window, so a first answer token keeps its leading space.
DETOKENIZER_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class TokenDecoder(Protocol):
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, decoding only a short sliding window.

    A token can end inside a multi-byte UTF-8 character; its text then ends in U+FFFD, and we wait for
    the next token instead of emitting half a character.
    """

    def __init__(self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = list(prompt_token_ids[-DETOKENIZER_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)

    def push(self, new_token_ids: Sequence[int]) -> str:
        self.token_ids.extend(new_token_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset >= len(self.token_ids):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self.token_ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full_text = decode(self.token_ids[self.prefix_offset:], skip_special_tokens=True)
        if not final and (full_text.endswith(REPLACEMENT_CHAR) or len(full_text) <= len(prefix_text)):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full_text[len(prefix_text):]


@dataclass(slots=True)
class ChoiceDelta:
    """What one answer (choice) gained from one engine step."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[Any] | None
    finish_reason: str | None


@dataclass(slots=True)
class GenerationUpdate:
    """One step's news for a request: the choices that changed, and the running token counts."""

    choices: list[ChoiceDelta]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finished: bool


class AnswerText:
    """The text of one choice: detokenized, cut at stop strings, with its finish reason."""

    def __init__(self, index: int, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int],
                 stop_strings: Sequence[str]) -> None:
        self.index = index
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self.matcher = StopStringMatcher(stop_strings)
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def push(self, new_token_ids: list[int], logprobs: list[Any] | None,
             engine_finish_reason: str | None) -> ChoiceDelta | None:
        if self.finish_reason is not None:
            return None
        self.num_tokens += len(new_token_ids)
        text = self.matcher.push(self.detokenizer.push(new_token_ids))
        if engine_finish_reason is not None and not self.matcher.stopped:
            text += self.matcher.push(self.detokenizer.flush())
            text += self.matcher.flush()
        if self.matcher.stopped:
            self.finish_reason = "stop"
        elif engine_finish_reason is not None:
            self.finish_reason = engine_finish_reason
        if not text and not new_token_ids and self.finish_reason is None:
            return None
        return ChoiceDelta(self.index, text, list(new_token_ids), logprobs, self.finish_reason)


class ServingMetrics:
    """The `llm:` metrics, named after vLLM's."""

    TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
    ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
    E2E_BUCKETS = (0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)

    def __init__(self, registry: CollectorRegistry) -> None:
        self.running = Gauge("llm:num_requests_running", "Requests in the engine's running batch",
                             registry=registry)
        self.waiting = Gauge("llm:num_requests_waiting", "Requests waiting to be scheduled", registry=registry)
        self.kv_usage = Gauge("llm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)",
                              registry=registry)
        # In blocks, so that a leak (blocks held with nothing running) reads as a count, not a rounded ratio.
        self.kv_blocks_in_use = Gauge("llm:kv_cache_blocks_in_use", "KV-cache blocks held by live sequences",
                                      registry=registry)
        self.prefix_queries = Counter("llm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=registry)
        self.prefix_hits = Counter("llm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   registry=registry)
        self.preemptions = Counter("llm:num_preemptions", "Sequences preempted for lack of KV blocks",
                                   registry=registry)
        self.prompt_tokens = Counter("llm:prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generation_tokens = Counter("llm:generation_tokens", "Tokens generated", registry=registry)
        self.spec_draft_tokens = Counter("llm:spec_decode_num_draft_tokens",
                                         "Speculative decoding: draft tokens checked by the model", registry=registry)
        self.spec_accepted_tokens = Counter("llm:spec_decode_num_accepted_tokens",
                                            "Speculative decoding: draft tokens accepted", registry=registry)
        self.request_success = Counter("llm:request_success", "Finished requests by finish reason",
                                       ["finished_reason"], registry=registry)
        self.ttft = Histogram("llm:time_to_first_token_seconds", "Time to first token", buckets=self.TTFT_BUCKETS,
                              registry=registry)
        self.itl = Histogram("llm:inter_token_latency_seconds", "Time between output tokens",
                             buckets=self.ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("llm:e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=self.E2E_BUCKETS, registry=registry)
        self.queue_time = Histogram("llm:request_queue_time_seconds", "Time from arrival to first scheduling",
                                    buckets=self.E2E_BUCKETS, registry=registry)
        self._totals: dict[str, int] = {}

    def observe_engine(self, stats: Any) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.kv_blocks_in_use.set(stats.num_total_blocks - stats.num_free_blocks)
        for name, counter in (("prefix_cache_queries", self.prefix_queries),
                              ("prefix_cache_hits", self.prefix_hits),
                              ("num_preemptions", self.preemptions),
                              ("prompt_tokens_total", self.prompt_tokens),
                              ("generation_tokens_total", self.generation_tokens),
                              ("spec_draft_tokens_total", self.spec_draft_tokens),
                              ("spec_accepted_tokens_total", self.spec_accepted_tokens)):
            total = int(getattr(stats, name))
            delta = total - self._totals.get(name, 0)
            if delta > 0:
                counter.inc(delta)
            self._totals[name] = total


class EngineDied(RuntimeError):
    pass


@dataclass(slots=True)
class _RequestStream:
    """Where the engine thread puts one request's outputs (or the error that ended it)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(slots=True)
class _AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: Any
    arrival_time: float
    lora_name: str | None


@dataclass(slots=True)
class _AbortRequest:
    request_id: str


@dataclass(slots=True)
class _StopChoice:
    """A choice's text reached a stop string: the engine ends that choice now, its siblings go on."""

    request_id: str
    index: int


_Command = _AddRequest | _AbortRequest | _StopChoice


class ServingLoop:
    """Runs the engine in its own thread and serves each request as an async stream of updates."""

    def __init__(self, engine: Any, *, max_num_seqs: int, max_waiting: int, request_timeout: float,
                 metrics: ServingMetrics, readiness: Readiness) -> None:
        self.engine = engine
        self.capacity = max_num_seqs + max_waiting
        self.request_timeout = request_timeout
        self.metrics = metrics
        self.readiness = readiness
        self.in_flight = 0
        self.dead_reason: str | None = None
        self.draining = False
        self._streams: dict[str, _RequestStream] = {}
        self._commands: list[_Command] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self.readiness.set_ready()

    async def shutdown(self, timeout: float) -> None:
        """Stop taking requests, let running ones finish until `timeout`, abort the rest, stop the thread."""
        self.draining = True
        self.readiness.set_not_ready("shutting down")
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline and self.dead_reason is None:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("shutdown deadline passed; aborting %d requests", self.in_flight)
            for request_id in list(self._streams):
                self._send(_AbortRequest(request_id))
                self._streams[request_id].put(APIError(503, "server is shutting down"))
        with self._wake:
            self._stopping = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join, 10.0)

    def check_accepting(self, num_sequences: int = 1) -> None:
        if self.dead_reason is not None:
            raise APIError(503, f"engine is not running: {self.dead_reason}")
        if self.draining:
            raise APIError(503, "server is shutting down")
        if self.in_flight + num_sequences > self.capacity:
            raise APIError(429, f"too many requests: {self.in_flight} in flight, limit {self.capacity}; "
                                "retry later")

    async def generate(self, prompt_token_ids: list[int], params: Any, stop_strings: Sequence[str] = (),
                       lora_name: str | None = None) -> AsyncIterator[GenerationUpdate]:
        """Updates for one request (under the LoRA adapter `lora_name`, if given) until it finishes. Closing the
        iterator early aborts the request."""
        sequences = max(1, int(getattr(params, "n", 1)))
        self.check_accepting(sequences)
        request_id = uuid.uuid4().hex
        stream = _RequestStream(asyncio.get_running_loop())
        answers = [AnswerText(i, self.engine.tokenizer, prompt_token_ids, stop_strings) for i in range(sequences)]
        arrival = time.perf_counter()
        last_token_at: float | None = None
        finish_reason = "abort"
        self._streams[request_id] = stream
        self.in_flight += sequences
        self._send(_AddRequest(request_id, prompt_token_ids, params, time.time(), lora_name))
        try:
            async with asyncio.timeout(self.request_timeout):
                while True:
                    item = await stream.queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    received = time.perf_counter()
                    deltas = []
                    for output in item.outputs:
                        delta = answers[output.index].push(list(output.new_token_ids), output.logprobs,
                                                           output.finish_reason)
                        if delta is None:
                            continue
                        deltas.append(delta)
                        if delta.finish_reason is not None and output.finish_reason is None:
                            self._send(_StopChoice(request_id, output.index))  # a stop string ended it here
                    new_tokens = sum(len(d.token_ids) for d in deltas)
                    if new_tokens:
                        if last_token_at is None:
                            self.metrics.ttft.observe(received - arrival)
                            self._observe_queue_time(item)
                        else:
                            self.metrics.itl.observe((received - last_token_at) / new_tokens)
                        last_token_at = received
                    done = all(a.finish_reason is not None for a in answers)
                    if done:
                        finish_reason = "stop" if any(a.finish_reason == "stop" for a in answers) else "length"
                    yield GenerationUpdate(deltas, len(item.prompt_token_ids), int(item.num_cached_tokens or 0),
                                           sum(a.num_tokens for a in answers), done)
                    if done:
                        return
        except TimeoutError:
            raise APIError(503, f"request timed out after {self.request_timeout:g}s and was aborted",
                           code="request_timeout") from None
        finally:
            self._streams.pop(request_id, None)
            self.in_flight -= sequences
            if finish_reason == "abort":
                self._send(_AbortRequest(request_id))
            self.metrics.request_success.labels(finish_reason).inc()
            self.metrics.e2e.observe(time.perf_counter() - arrival)

    def _observe_queue_time(self, output: Any) -> None:
        timings = getattr(output, "timings", None)
        arrival = _timing(timings, "arrival")
        scheduled = _timing(timings, "first_scheduled")
        if arrival is not None and scheduled is not None and scheduled >= arrival:
            self.metrics.queue_time.observe(scheduled - arrival)

    def _send(self, command: _Command) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    # ---- engine-thread side ----------------------------------------------------------------------------

    def _run(self) -> None:
        log.info("engine thread started")
        try:
            while (commands := self._next_commands()) is not None:
                for command in commands:
                    self._apply(command)
                if self.engine.has_unfinished():
                    for output in self.engine.step():
                        stream = self._streams.get(output.request_id)
                        if stream is not None:
                            stream.put(output)
                self.metrics.observe_engine(self.engine.stats())
        except Exception as exc:
            self._die(exc)
        log.info("engine thread stopped")

    def _next_commands(self) -> list[_Command] | None:
        """The pending commands; blocks while the engine is idle; None once stopping with nothing left."""
        with self._wake:
            while not self._commands and not self._stopping and not self.engine.has_unfinished():
                self._wake.wait()
            if self._stopping and not self._commands and not self.engine.has_unfinished():
                return None
            commands, self._commands = self._commands, []
            return commands

    def _apply(self, command: _Command) -> None:
        if isinstance(command, _AbortRequest):
            with contextlib.suppress(KeyError):  # already finished, or never added
                self.engine.abort(command.request_id)
            return
        if isinstance(command, _StopChoice):
            self.engine.finish_by_stop_string(command.request_id, command.index)
            return
        stream = self._streams.get(command.request_id)
        if stream is None:  # the client went away before the engine saw the request
            return
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                    arrival_time=command.arrival_time, lora_name=command.lora_name)
        except ValueError as exc:
            stream.put(APIError(400, str(exc)))

    def _die(self, exc: Exception) -> None:
        self.dead_reason = f"{type(exc).__name__}: {exc}"
        log.exception("engine thread died: %s", self.dead_reason)
        self.readiness.set_not_ready(f"engine died: {self.dead_reason}")
        for stream in list(self._streams.values()):
            stream.put(APIError(500, f"engine failed while serving this request: {self.dead_reason}"))


def _timing(timings: Any, name: str) -> float | None:
    if timings is None:
        return None
    value = timings.get(name) if isinstance(timings, dict) else getattr(timings, name, None)
    return float(value) if isinstance(value, int | float) else None
