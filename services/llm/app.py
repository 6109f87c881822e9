"""OpenAI-compatible routes over the serving loop: completions, chat completions, tokenize, detokenize.

Routes validate, turn the request into prompt token ids and sampling parameters, call the serving loop, and
shape its updates into OpenAI responses or SSE chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from common.errors import APIError, bad_request, error_body, not_found
from common.health import Readiness
from common.model_files import bundled_llm, resolve_model
from common.schemas.openai import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatMessage,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    LoadLoRAAdapterRequest,
    PromptTokensDetails,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprobEntry,
    TopLogprob,
    UnloadLoRAAdapterRequest,
    Usage,
    new_id,
)
from common.service import ModelCard, create_app
from services.llm.guided import GrammarError, GuidedDecoding
from services.llm.lora_adapters import parse_lora_modules
from services.llm.protocol.structured import guided_decoding
from services.llm.protocol.tool_parsers import ToolCallFamily, tool_call_family
from services.llm.protocol.tools import answer_parsers, plan_tools, template_message
from services.llm.serving import ChoiceDelta, GenerationUpdate, ServingLoop, ServingMetrics
from services.llm.settings import LLMSettings

log = logging.getLogger(__name__)

DISCONNECT_POLL_SECONDS = 0.1


def served_model_id(settings: LLMSettings, model: str) -> str:
    if settings.served_model_name:
        return settings.served_model_name
    path = Path(model)
    return path.name if path.exists() else model


def load_engine(settings: LLMSettings, model: str, lora_modules: dict[str, str]) -> Any:
    """The engine, with the LoRA adapters of LLM_LORA_MODULES loaded."""
    from services.llm.engine import EngineConfig, LLMEngine
    from services.llm.speculative import SpeculativeConfig

    speculative = SpeculativeConfig(method=settings.speculative_method, num_tokens=settings.speculative_num_tokens,
                                    ngram_min=settings.speculative_ngram_min, ngram_max=settings.speculative_ngram_max,
                                    draft_model=settings.speculative_draft_model,
                                    max_batch=settings.speculative_max_batch)
    config = EngineConfig(model=model, device=settings.device, dtype=settings.dtype, block_size=settings.block_size,
                          kv_cache_gib=settings.kv_cache_gib, gpu_memory_utilization=settings.gpu_memory_utilization,
                          max_num_seqs=settings.max_num_seqs, max_num_batched_tokens=settings.max_num_batched_tokens,
                          long_prefill_token_threshold=settings.long_prefill_token_threshold,
                          max_prefill_tokens_per_step=settings.max_prefill_tokens_per_step,
                          max_model_len=settings.max_model_len, enable_prefix_caching=settings.enable_prefix_caching,
                          seed=settings.seed, enable_cuda_graphs=settings.cuda_graphs and not settings.enforce_eager,
                          speculative=speculative, max_loras=lora_slots(settings, lora_modules),
                          max_lora_rank=settings.max_lora_rank, quantization=settings.quantization,
                          cpu_weight_packing=settings.cpu_weight_packing, gguf_weights=settings.gguf_weights,
                          kv_cache_dtype=settings.kv_cache_dtype, cpu_compile=settings.cpu_compile,
                          cpu_attention=settings.cpu_attention, cpu_elementwise=settings.cpu_elementwise,
                          cpu_matmul=settings.cpu_matmul, cpu_adaptive_threads=settings.cpu_adaptive_threads,
                          cpu_front_end_core_tokens=settings.cpu_front_end_core_tokens)
    engine = LLMEngine(config)
    for name, path in lora_modules.items():
        engine.load_lora(name, path)
    return engine


def lora_slots(settings: LLMSettings, lora_modules: dict[str, str]) -> int:
    if settings.max_loras:
        if settings.max_loras < len(lora_modules):
            raise ValueError(f"LLM_LORA_MODULES names {len(lora_modules)} adapters but LLM_MAX_LORAS is "
                             f"{settings.max_loras}")
        return settings.max_loras
    return max(4, len(lora_modules)) if lora_modules else 0


class LLMService:
    """The state routes share: the engine (once loaded), its serving loop and the served model id."""

    def __init__(self, settings: LLMSettings, readiness: Readiness, metrics: ServingMetrics) -> None:
        self.settings = settings
        self.model_path = resolve_model(settings.model, bundled_llm() if not settings.model else None)
        self.model_id = served_model_id(settings, self.model_path)
        self.lora_modules = parse_lora_modules(settings.lora_modules)
        if self.model_id in self.lora_modules:
            raise ValueError(f"LoRA module name {self.model_id!r} is the base model's id")
        self.readiness = readiness
        self.metrics = metrics
        self.serving: ServingLoop | None = None
        self.parameters = 0  # the model's parameter count once loaded: clients size their prompts by it
        self.gguf_blocks: dict[str, int] = {}  # projections kept in GGUF block formats, per format
        self.tool_family: ToolCallFamily | None = None

    async def load(self) -> None:
        log.info("loading model %s", self.model_path)
        try:
            engine = await asyncio.to_thread(load_engine, self.settings, self.model_path, self.lora_modules)
            self.tool_family = tool_call_family(engine.tokenizer, self.settings.tool_call_parser)
        except Exception as exc:
            log.exception("model failed to load")
            self.readiness.set_not_ready(f"model failed to load: {type(exc).__name__}: {exc}")
            return
        from services.llm.layers.gguf_linear import block_format_counts
        from services.llm.loader import parameter_count

        self.parameters = parameter_count(engine.runner.model)  # the base model's, not LoRA slots
        self.gguf_blocks = block_format_counts(engine.runner.model)
        self.serving = ServingLoop(engine, max_num_seqs=self.settings.max_num_seqs,
                                   max_waiting=self.settings.max_waiting,
                                   request_timeout=self.settings.request_timeout, metrics=self.metrics,
                                   readiness=self.readiness)
        self.serving.start()
        log.info("serving %s as %r, context %d tokens", self.model_path, self.model_id, engine.max_model_len)

    def loop(self) -> ServingLoop:
        if self.serving is None:
            raise APIError(503, self.readiness.message)
        return self.serving

    @property
    def tokenizer(self) -> Any:
        return self.loop().engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return int(self.loop().engine.max_model_len)

    def models(self) -> list[ModelCard]:
        metadata: dict[str, object] = {"root": self.model_path}
        if self.serving is not None:
            metadata["max_model_len"] = self.max_model_len
            metadata["parameters"] = self.parameters
            engine = self.loop().engine
            # The profile says what the device allows; whether graphs were captured is the runner's to say.
            metadata["hardware"] = {**engine.hardware.describe(),
                                    "cuda_graphs": engine.runner.decode_graphs is not None}
            spec = engine.config.speculative
            metadata["speculative"] = {"method": spec.method, "num_tokens": spec.num_tokens} if spec.enabled \
                else {"method": "off"}
            metadata["max_loras"] = engine.config.max_loras
            metadata["quantization"] = engine.config.quantization
            metadata["gguf_blocks"] = self.gguf_blocks
            metadata["kv_cache_dtype"] = engine.config.kv_cache_dtype
            metadata["kv_cache"] = engine.kv_cache_capacity()
            metadata["capabilities"] = self.capabilities()
            adapters = engine.lora_adapters()
        else:
            adapters = []
        cards = [ModelCard(self.model_id, metadata=metadata)]
        cards += [ModelCard(a.name, metadata={"root": a.path, "parent": self.model_id, "lora_rank": a.rank})
                  for a in adapters]
        return cards

    def check_model(self, model: str | None) -> str | None:
        """The LoRA adapter the request's `model` names, or None for the base model."""
        if model is None or model == self.model_id:
            return None
        if self.serving is not None and any(a.name == model for a in self.loop().engine.lora_adapters()):
            return model
        raise not_found(f"model {model!r} does not exist; this server serves {self.model_id!r}"
                        + (" and its LoRA adapters (see /v1/models)" if self.lora_enabled else ""), param="model")

    @property
    def lora_enabled(self) -> bool:
        return self.serving is not None and self.loop().engine.loras is not None

    async def load_lora(self, name: str, path: str) -> None:
        engine = self.loop().engine
        if not self.lora_enabled:
            raise bad_request("LoRA is off on this server: start it with LLM_MAX_LORAS > 0 or LLM_LORA_MODULES")
        if name == self.model_id:
            raise bad_request(f"{name!r} is the base model's id", "lora_name")
        try:
            await asyncio.to_thread(engine.load_lora, name, path)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc

    async def unload_lora(self, name: str) -> None:
        engine = self.loop().engine
        if not any(a.name == name for a in engine.lora_adapters()):
            raise not_found(f"no LoRA adapter named {name!r} is loaded", "lora_name")
        try:
            await asyncio.to_thread(engine.unload_lora, name)
        except ValueError as exc:
            raise bad_request(str(exc), "lora_name") from exc

    def capabilities(self) -> dict[str, object]:
        """What requests may ask of this server beyond plain sampling (`/v1/models`)."""
        family = self.family()
        return {"response_format": ["text", "json_object", "json_schema"],
                "guided_decoding": ["guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                    "structured_outputs", "nvext"],
                "tools": True, "tool_choice": ["none", "auto", "required", "named"],
                "tool_call_parser": family.name, "parallel_tool_calls": family.format.parallel,
                "logprobs": True, "echo": True, "best_of": True, "logit_bias": True, "n": True}

    def family(self) -> ToolCallFamily:
        self.loop()
        assert self.tool_family is not None
        return self.tool_family

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_messages(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        conversation, _ = self.family().prepare([template_message(m) for m in messages], None)
        return self.encode_chat(conversation, None, add_generation_prompt)

    def encode_chat(self, conversation: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    add_generation_prompt: bool = True) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(conversation, tools=tools,
                                                      add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as exc:  # jinja templates raise their own errors for conversations they refuse
            raise bad_request(f"the model's chat template rejected the messages: {exc}", "messages") from exc
        return self.encode_text(text, add_special_tokens=False)

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab = len(self.tokenizer)
        if any(t >= vocab for t in token_ids):
            raise bad_request(f"token ids must be below the vocabulary size {vocab}", param)

    def logit_bias(self, body: SamplingFields) -> dict[int, float] | None:
        if not body.logit_bias:
            return None
        bias = {}
        vocab = len(self.tokenizer)
        for key, value in body.logit_bias.items():
            if not key.isdigit() or int(key) >= vocab:
                raise bad_request(f"logit_bias keys are token ids below the vocabulary size {vocab}, got {key!r}",
                                  "logit_bias")
            bias[int(key)] = value
        return bias

    async def check_guided(self, guided: GuidedDecoding | None, param: str) -> None:
        """Compiles the constraint now (off the event loop), so a bad one is a 400 here and the engine finds it
        compiled."""
        if guided is None:
            return
        try:
            await asyncio.to_thread(self.loop().engine.guided.compiler.compile, guided)
        except GrammarError as exc:
            raise bad_request(str(exc), param) from exc

    def sampling_params(self, body: SamplingFields, prompt_tokens: int, max_tokens: int | None,
                        logprobs: int | None, guided: GuidedDecoding | None = None, n: int | None = None) -> Any:
        from services.llm.engine import SamplingParams

        context = self.max_model_len
        room = context - prompt_tokens
        if room < 1:
            raise bad_request(f"the prompt has {prompt_tokens} tokens, which leaves no room in the model's "
                              f"context of {context} tokens", "messages" if max_tokens is None else "prompt")
        if max_tokens is not None and max_tokens > room:
            raise bad_request(f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: "
                              f"{prompt_tokens + max_tokens} is over the model's context of {context} tokens",
                              "max_tokens")
        try:
            return SamplingParams(max_tokens=max_tokens if max_tokens is not None else room,
                                  temperature=body.temperature, top_p=body.top_p,
                                  top_k=-1 if body.top_k == 0 else body.top_k, min_p=body.min_p, seed=body.seed,
                                  n=n or body.n, ignore_eos=body.ignore_eos, min_tokens=body.min_tokens,
                                  logprobs=logprobs, presence_penalty=body.presence_penalty,
                                  frequency_penalty=body.frequency_penalty,
                                  repetition_penalty=body.repetition_penalty, logit_bias=self.logit_bias(body),
                                  guided=guided)
        except ValueError as exc:
            raise bad_request(str(exc)) from exc

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens))


def _sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json(exclude_none=True) if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def _merged(streams: list[AsyncIterator[GenerationUpdate]]) -> AsyncIterator[tuple[int, GenerationUpdate]]:
    """Updates of several requests as they come, tagged with the request's position."""
    if len(streams) == 1:
        async for update in streams[0]:
            yield 0, update
        return
    queue: asyncio.Queue[tuple[int, GenerationUpdate | BaseException | None]] = asyncio.Queue()

    async def pump(position: int, stream: AsyncIterator[GenerationUpdate]) -> None:
        try:
            async for update in stream:
                await queue.put((position, update))
        except Exception as exc:
            await queue.put((position, exc))
        await queue.put((position, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            position, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _unless_disconnected(request: Request, work: Callable[[], Any]) -> Any:
    """Runs `work()`; if the client disconnects first, cancels it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work())

    async def watch() -> None:
        # The body is already read, so the next ASGI message is the client going away.
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(DISCONNECT_POLL_SECONDS)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    log.info("client disconnected; request aborted")
    return Response(status_code=499)


class Totals:
    """Token counts summed over the requests of one API call."""

    def __init__(self, requests: int) -> None:
        self.prompt = [0] * requests
        self.cached = [0] * requests
        self.completion = [0] * requests

    def add(self, position: int, update: GenerationUpdate) -> None:
        self.prompt[position] = update.prompt_tokens
        self.cached[position] = update.cached_tokens
        self.completion[position] = update.completion_tokens

    def usage(self) -> Usage:
        return _usage(sum(self.prompt), sum(self.completion), sum(self.cached))


def check_best_of(body: CompletionRequest) -> bool:
    """Whether the request ranks answers (best_of above n); 400 for what best_of cannot mean."""
    if body.best_of is None or body.best_of == body.n:
        return False
    if body.best_of < body.n:
        raise bad_request(f"best_of ({body.best_of}) must be at least n ({body.n})", "best_of")
    if body.stream:
        raise bad_request("best_of above n cannot be streamed (the best answers are known only at the end)",
                          "best_of")
    return True


def cumulative_logprob(answer: list[ChoiceDelta]) -> float:
    return sum(float(e.logprob) for d in answer for e in (d.logprobs or []))


def build_app(settings: LLMSettings) -> FastAPI:
    registry = CollectorRegistry()
    readiness = Readiness()
    service = LLMService(settings, readiness, ServingMetrics(registry))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(service.load())
        yield
        loading.cancel()
        if service.serving is not None:
            await service.serving.shutdown(settings.shutdown_timeout)

    app = create_app(title="LLM", service="llm", settings=settings, readiness=readiness, registry=registry,
                     models=service.models, lifespan=lifespan)
    app.state.llm = service

    def completion_logprobs(deltas: list[ChoiceDelta], offset: int) -> CompletionLogprobs | None:
        entries = [e for d in deltas for e in (d.logprobs or [])]
        if not any(d.logprobs is not None for d in deltas):
            return None
        result = CompletionLogprobs()
        for entry in entries:
            token = service.token_text(entry.token_id)
            result.tokens.append(token)
            result.token_logprobs.append(float(entry.logprob))
            result.top_logprobs.append({service.token_text(t): float(lp) for t, lp in entry.top})
            result.text_offset.append(offset)
            offset += len(token)
        return result

    def chat_logprobs(deltas: list[ChoiceDelta]) -> ChatLogprobs | None:
        if not any(d.logprobs is not None for d in deltas):
            return None
        content = []
        for entry in (e for d in deltas for e in (d.logprobs or [])):
            token = service.token_text(entry.token_id)
            top = [TopLogprob(token=(t := service.token_text(i)), logprob=float(lp), bytes=list(t.encode()))
                   for i, lp in entry.top]
            content.append(TokenLogprobEntry(token=token, logprob=float(entry.logprob), bytes=list(token.encode()),
                                             top_logprobs=top))
        return ChatLogprobs(content=content)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        lora = service.check_model(body.model)
        loop = service.loop()
        prompts = []
        for position, prompt in enumerate(body.prompts):
            if isinstance(prompt, str):
                prompts.append(service.encode_text(prompt))
            else:
                service.check_token_ids(prompt, f"prompt[{position}]" if len(body.prompts) > 1 else "prompt")
                prompts.append(prompt)
        ranked = check_best_of(body)  # n answers kept out of best_of generated, by log-probability
        if body.echo and body.logprobs is not None:
            raise bad_request("echo with logprobs would need the prompt's log-probabilities, which this server "
                              "does not compute", "echo")
        constraint = guided_decoding(body)
        guided = constraint[1] if constraint else None
        logprobs = body.logprobs if not ranked else (body.logprobs or 0)
        params = [service.sampling_params(body, len(p), body.max_tokens, logprobs, guided, body.best_of)
                  for p in prompts]
        await service.check_guided(guided, constraint[0] if constraint else "")
        per_prompt = params[0].n
        loop.check_accepting(len(prompts) * per_prompt)
        stop = body.stop_strings
        model = lora or service.model_id
        echoes = [(p if isinstance(p, str) else service.tokenizer.decode(p)) if body.echo else ""
                  for p in body.prompts]
        streams = [loop.generate(p, sp, stop, lora) for p, sp in zip(prompts, params, strict=True)]

        def choice_index(position: int, delta: ChoiceDelta) -> int:
            return position * body.n + delta.index

        if body.stream:
            response_id = new_id("cmpl")

            async def events() -> AsyncIterator[str]:
                totals = Totals(len(prompts))
                offsets = [0] * (len(prompts) * body.n)
                if body.echo:
                    yield _sse(CompletionChunk(id=response_id, model=model, choices=[
                        CompletionChoice(index=i, text=echoes[i // body.n]) for i in range(len(offsets))]))
                try:
                    async for position, update in _merged(streams):
                        totals.add(position, update)
                        choices = []
                        for delta in update.choices:
                            index = choice_index(position, delta)
                            choices.append(CompletionChoice(index=index, text=delta.text,
                                                            logprobs=completion_logprobs([delta], offsets[index]),
                                                            finish_reason=delta.finish_reason))
                            offsets[index] += len(delta.text)
                        if choices:
                            yield _sse(CompletionChunk(id=response_id, model=model, choices=choices))
                    if body.include_usage:
                        yield _sse(CompletionChunk(id=response_id, model=model, choices=[], usage=totals.usage()))
                except APIError as exc:
                    yield _sse(error_body(exc.status, exc.message, code=exc.code))
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async def collect() -> CompletionResponse:
            totals = Totals(len(prompts))
            deltas: dict[tuple[int, int], list[ChoiceDelta]] = {}
            async for position, update in _merged(streams):
                totals.add(position, update)
                for delta in update.choices:
                    deltas.setdefault((position, delta.index), []).append(delta)
            choices = []
            for position in range(len(prompts)):
                answers = [deltas.get((position, i), []) for i in range(per_prompt)]
                if ranked:
                    answers = sorted(answers, key=cumulative_logprob, reverse=True)[:body.n]
                for i, answer in enumerate(answers):
                    choices.append(CompletionChoice(
                        index=position * body.n + i, text=echoes[position] + "".join(d.text for d in answer),
                        logprobs=completion_logprobs(answer, 0) if body.logprobs is not None else None,
                        finish_reason=answer[-1].finish_reason if answer else None))
            return CompletionResponse(model=model, choices=choices, usage=totals.usage())

        return await _unless_disconnected(request, collect)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        lora = service.check_model(body.model)
        loop = service.loop()
        family = service.family()
        plan = plan_tools(body, family)
        constraint = guided_decoding(body, plan.guided)
        guided = constraint[1] if constraint else None
        prompt = service.encode_chat(plan.conversation, plan.template_tools)
        top = (body.top_logprobs or 0) if body.logprobs else None
        params = service.sampling_params(body, len(prompt), body.answer_limit, top, guided)
        await service.check_guided(guided, constraint[0] if constraint else "")
        loop.check_accepting(body.n)
        stream = loop.generate(prompt, params, body.stop_strings, lora)
        model = lora or service.model_id
        answers = answer_parsers(plan, family, body.n)

        if body.stream:
            response_id = new_id("chatcmpl")

            async def events() -> AsyncIterator[str]:
                first = [ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))
                         for i in range(body.n)]
                yield _sse(ChatCompletionChunk(id=response_id, model=model, choices=first))
                usage = _usage(len(prompt), 0, 0)
                try:
                    async for update in stream:
                        usage = _usage(update.prompt_tokens, update.completion_tokens, update.cached_tokens)
                        choices = []
                        for d in update.choices:
                            answer = answers[d.index]
                            content, calls = answer.push(d.text, d.finish_reason is not None)
                            if not (content or calls or d.finish_reason or d.logprobs):
                                continue  # text held back (a call's marker in the making): nothing to send yet
                            delta = ChatDelta(content=content if content or not calls else None,
                                              tool_calls=calls or None)
                            choices.append(ChatChunkChoice(index=d.index, delta=delta, logprobs=chat_logprobs([d]),
                                                           finish_reason=answer.finish_reason(d.finish_reason)))
                        if choices:
                            yield _sse(ChatCompletionChunk(id=response_id, model=model, choices=choices))
                    if body.include_usage:
                        yield _sse(ChatCompletionChunk(id=response_id, model=model, choices=[], usage=usage))
                except APIError as exc:
                    yield _sse(error_body(exc.status, exc.message, code=exc.code))
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")

        async def collect() -> ChatCompletionResponse:
            deltas: dict[int, list[ChoiceDelta]] = {i: [] for i in range(body.n)}
            finish: dict[int, str | None] = {}
            usage = _usage(len(prompt), 0, 0)
            async for update in stream:
                usage = _usage(update.prompt_tokens, update.completion_tokens, update.cached_tokens)
                for delta in update.choices:
                    answers[delta.index].push(delta.text, delta.finish_reason is not None)
                    deltas[delta.index].append(delta)
                    finish[delta.index] = delta.finish_reason
            choices = [ChatChoice(index=i, message=answers[i].message(), logprobs=chat_logprobs(deltas[i]),
                                  finish_reason=answers[i].finish_reason(finish.get(i)))
                       for i in range(body.n)]
            return ChatCompletionResponse(model=model, choices=choices, usage=usage)

        return await _unless_disconnected(request, collect)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse)
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> str:
        await service.load_lora(body.lora_name, body.lora_path)
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse)
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> str:
        await service.unload_lora(body.lora_name)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        service.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give exactly one of 'prompt' or 'messages'")
        if body.messages is not None:
            tokens = service.encode_messages(body.messages, body.add_generation_prompt)
        else:
            tokens = service.encode_text(body.prompt or "", body.add_special_tokens)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=service.max_model_len)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        service.check_model(body.model)
        if any(t < 0 for t in body.tokens):
            raise bad_request("token ids must be non-negative", "tokens")
        service.check_token_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=service.tokenizer.decode(body.tokens))

    return app
