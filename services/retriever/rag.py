"""Answering with retrieval: query → candidates → optional rerank → a prompt that fits the LLM → the answer.

The prompt's layout and which sources it takes are in prompt.py; here the earlier turns (oldest dropped first if
needed) and the sources are fitted to the LLM's context and to what the model reads well.

A dependency down degrades the answer instead of failing it where it can (see KnowledgeBase.search), and the
answer carries `warnings` saying what was left out. The whole answer runs under one deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from common.errors import APIError, bad_request
from common.schemas.retriever import Citation, Citations, GenerateRequest
from services.retriever.dependencies import LLMClient, RerankClient
from services.retriever.knowledge_base import Hit, KnowledgeBase
from services.retriever.prompt import rag_messages, source_block, source_budget, sources_that_fit

log = logging.getLogger(__name__)

_TEMPLATE_MARGIN = 16  # tokens for separators the per-piece counts do not see
_T = TypeVar("_T")


@dataclass(slots=True)
class PreparedAnswer:
    messages: list[dict]
    citations: Citations | None
    body: dict
    warnings: list[str] = field(default_factory=list)
    affinity: str | None = None  # the sources at the head of the prompt: answers over them share an LLM replica


class RagPipeline:
    def __init__(self, knowledge_base: KnowledgeBase, llm: LLMClient, reranker: RerankClient | None, *,
                 system_prompt: str, vdb_top_k: int, reranker_top_k: int, default_max_tokens: int,
                 answer_instruction: str = "", source_tokens: int = 0, min_score_ratio: float = 0.0,
                 sole_source_parameters: int = 0, deadline: float = 600.0) -> None:
        self.kb, self.llm, self.reranker = knowledge_base, llm, reranker
        self.system_prompt, self.answer_instruction = system_prompt, answer_instruction
        self.source_tokens = source_tokens  # 0: by the LLM's size
        self.min_score_ratio = min_score_ratio  # for models with a source budget: sources near the best only
        self.sole_source_parameters = sole_source_parameters  # models up to this size: an agreed best source alone
        self.vdb_top_k, self.reranker_top_k = vdb_top_k, reranker_top_k
        self.default_max_tokens = default_max_tokens
        self.deadline = deadline

    # the overall deadline

    def start_deadline(self) -> float:
        """The event-loop time by which this answer must be complete."""
        return asyncio.get_running_loop().time() + self.deadline

    async def within(self, deadline: float, work: Awaitable[_T]) -> _T:
        """`work`, cancelled with a 503 if it is not done by `deadline`."""
        try:
            async with asyncio.timeout_at(deadline):
                return await work
        except TimeoutError:
            raise self._late() from None

    async def bounded(self, chunks: AsyncIterator[dict], deadline: float) -> AsyncIterator[dict]:
        """A stream that ends with a 503 error once `deadline` passes."""
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks, None)
            except TimeoutError:
                await chunks.aclose()  # type: ignore[attr-defined]
                raise self._late() from None
            if chunk is None:
                return
            yield chunk

    def _late(self) -> APIError:
        log.warning("RAG answer cut at its deadline of %gs", self.deadline)
        return APIError(503, f"the answer was not complete within the deadline of {self.deadline:g}s "
                             f"(RETRIEVER_RAG_TIMEOUT)", code="deadline_exceeded")

    async def rerank_by_default(self) -> bool:
        """Rerank by default only behind a cross-encoder; the bundled LLM scorer is slow and adds little."""
        if self.reranker is None:
            return False
        try:
            return await self.reranker.scorer_kind() == "cross_encoder"
        except APIError as exc:
            log.warning("reranker unavailable, answering without it: %s", exc.message)
            return False

    async def prepare(self, request: GenerateRequest) -> PreparedAnswer:
        conversation = [{"role": m.role, "content": m.text} for m in request.messages]
        user_turns = [i for i, m in enumerate(conversation) if m["role"] == "user"]
        if not user_turns:
            raise bad_request("messages must contain a user message (the question)", param="messages")
        last = user_turns[-1]
        question = conversation[last]["content"]
        history = [m for m in conversation[:last] if m["role"] != "system"]
        max_tokens = request.answer_limit or self.default_max_tokens
        body = {"temperature": request.temperature, "top_p": request.top_p, "max_tokens": max_tokens}
        if request.stop is not None:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if request.response_format is not None:
            body["response_format"] = request.response_format.model_dump(by_alias=True, exclude_none=True)
        if not request.use_knowledge_base:
            return PreparedAnswer(conversation, None, body)
        if not request.collections:
            raise bad_request("collection_names is required when use_knowledge_base is true",
                              param="collection_names")
        rerank = request.enable_reranker if request.enable_reranker is not None else await self.rerank_by_default()
        found = await self.kb.search(question, request.collections, top_k=request.vdb_top_k or self.vdb_top_k,
                                     search_type=request.search_type, metadata_filter=request.filter, rerank=rerank,
                                     reranker_top_k=request.reranker_top_k or self.reranker_top_k)
        hits = found.hits if rerank else found.hits[:request.reranker_top_k or self.reranker_top_k]
        messages, used = await self._fit(question, history, hits, max_tokens, found.unanimous)
        citations = Citations(total_results=len(used), results=[
            Citation(document_id=h.chunk.document_id, document_name=h.chunk.document_name, content=h.chunk.content,
                     score=h.score, metadata=h.chunk.metadata) for h in used]) if request.enable_citations else None
        affinity = "\n".join(f"{h.chunk.collection}/{h.chunk.chunk_id}" for h in used) if used else None
        return PreparedAnswer(messages, citations, body, found.warnings, affinity)

    async def _fit(self, question: str, history: list[dict], hits: list[Hit], max_tokens: int,
                   unanimous: bool = False) -> tuple[list[dict], list[Hit]]:
        """The best sources that fit the context after the system prompt, the conversation and the answer, and
        that the model reads well (its source budget; for a small model, the best alone when `unanimous`: every
        retriever ranked it first)."""
        context = await self.llm.context_length()

        def layout(turns: list[dict], sources: list[str]) -> list[dict]:
            return rag_messages(self.system_prompt, turns, sources, question, self.answer_instruction)

        turns = list(history)
        while True:
            base = await self.llm.count_messages(layout(turns, []))
            room = context - max_tokens - base - _TEMPLATE_MARGIN
            if room >= 0 or not turns:
                break
            turns = turns[1:]  # drop the oldest turn first; the question itself is never dropped
        if room < 0:
            raise bad_request(f"the question needs {base} tokens and max_tokens is {max_tokens}, but the model's "
                              f"context is {context} tokens", param="messages")
        blocks = [source_block(n, hit.chunk.content, hit.chunk.metadata.get("page"))
                  for n, hit in enumerate(hits, start=1)]
        costs = await self.llm.count_tokens(blocks) if blocks else []
        parameters = await self.llm.parameters()
        budget = self.source_tokens or source_budget(parameters)
        alone = unanimous and parameters is not None and parameters <= self.sole_source_parameters
        used = sources_that_fit(costs, room, budget, [hit.score for hit in hits], self.min_score_ratio, alone)
        return layout(turns, blocks[:used]), hits[:used]

    async def answer(self, prepared: PreparedAnswer) -> dict:
        reply = await self.llm.chat({**prepared.body, "messages": prepared.messages}, affinity=prepared.affinity)
        if prepared.citations is not None:
            reply["citations"] = prepared.citations.model_dump()
        if prepared.warnings:
            reply["warnings"] = prepared.warnings
        return reply

    async def stream(self, prepared: PreparedAnswer, include_usage: bool) -> AsyncIterator[dict]:
        """The LLM's chunks, preceded by one carrying the citations; usage only when the caller asked for it."""
        events = self.llm.stream_chat({**prepared.body, "messages": prepared.messages},
                                     affinity=prepared.affinity)
        first = await anext(events, None)  # a dead LLM fails here, before any byte is sent, as a clean 503
        opening = {"id": (first or {}).get("id", f"chatcmpl-{uuid.uuid4().hex}"), "object": "chat.completion.chunk",
                   "created": (first or {}).get("created", int(time.time())), "model": (first or {}).get("model", ""),
                   "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
        if prepared.citations is not None:
            opening["citations"] = prepared.citations.model_dump()
        if prepared.warnings:
            opening["warnings"] = prepared.warnings

        async def chunks() -> AsyncIterator[dict]:
            yield opening
            if first is None:
                return
            if include_usage or first.get("choices"):
                yield first
            async for event in events:
                if include_usage or event.get("choices"):
                    yield event

        return chunks()


def sse(event: dict) -> str:
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n"
