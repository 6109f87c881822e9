"""The three services the retriever depends on, each a `common.replicas.ReplicaPool` of one or more replicas.

Model ids come from settings or, when empty, from each service's `/v1/models` (asked once, then kept).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
from collections.abc import AsyncIterator, Callable

import numpy as np

from common.errors import APIError
from common.http import DependencyError, ServiceClient
from common.replicas import ReplicaPool

log = logging.getLogger(__name__)
_NO_ROUTE = {404, 405, 501}  # what a server without /tokenize answers
_DEFAULT_CONTEXT = 4096
_FOREIGN_TOKENIZER_MARGIN = 1.25  # another tokenizer's count, inflated: an estimate must not overflow the context


class _ModelDiscovery:
    def __init__(self, client: ServiceClient | ReplicaPool, configured: str) -> None:
        self.client, self._model, self._card = client, configured, None
        self._lock = asyncio.Lock()

    async def card(self) -> dict:
        async with self._lock:
            if self._card is None:
                listing = await self.client.get_json("/v1/models")
                cards = listing.get("data") or []
                if not cards:
                    raise DependencyError(self.client.name, "serves no model")
                chosen = next((c for c in cards if c.get("id") == self._model), cards[0])
                self._card = chosen
                self._model = self._model or chosen["id"]
            return self._card

    async def model(self) -> str:
        if not self._model:
            await self.card()
        return self._model


class EmbeddingClient:
    """Vectors from the embed service. Texts go in requests of `batch_size`, up to `concurrency` at once, so the
    service's batcher sees them together (it sorts by length before batching); vectors come back as base64."""

    def __init__(self, client: ServiceClient | ReplicaPool, model: str = "", batch_size: int = 64,
                 concurrency: int = 4) -> None:
        assert batch_size > 0 and concurrency > 0
        self.client, self.batch_size, self.concurrency = client, batch_size, concurrency
        self.models = _ModelDiscovery(client, model)

    async def embed(self, texts: list[str], input_type: str) -> np.ndarray:
        """One float32 row per text, in the order given."""
        if not texts:
            return np.zeros((0, 0), np.float32)
        model = await self.models.model()
        gate = asyncio.Semaphore(self.concurrency)

        async def embed_batch(batch: list[str]) -> np.ndarray:
            body = {"input": batch, "model": model, "input_type": input_type, "encoding_format": "base64",
                    "truncate": "END"}
            async with gate:
                reply = await self.client.post_json("/v1/embeddings", body, idempotent=True)
            return self._rows(reply, len(batch))

        batches = [texts[start:start + self.batch_size] for start in range(0, len(texts), self.batch_size)]
        return np.concatenate(await asyncio.gather(*(embed_batch(batch) for batch in batches)))

    def _rows(self, reply: dict, expected: int) -> np.ndarray:
        data = sorted(reply.get("data") or [], key=lambda item: item["index"])
        if len(data) != expected:
            raise DependencyError(self.client.name, f"returned {len(data)} embeddings for {expected} inputs")
        rows = [decode_embedding(item["embedding"]) for item in data]
        if len({row.shape for row in rows}) != 1:
            raise DependencyError(self.client.name, "returned embeddings of different lengths")
        return np.stack(rows)


def decode_embedding(value: str | list[float]) -> np.ndarray:
    """An embedding as sent: base64 of little-endian float32 (OpenAI's format), or a float list from a server
    that ignores `encoding_format`."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


class RerankClient:
    def __init__(self, client: ServiceClient | ReplicaPool, model: str = "") -> None:
        self.client = client
        self.models = _ModelDiscovery(client, model)

    async def scorer_kind(self) -> str | None:
        """The card's `scorer` ("cross_encoder", "query_likelihood", "yes_no"), None if it does not say."""
        card = await self.models.card()
        kind = card.get("scorer") or (card.get("metadata") or {}).get("scorer")
        return str(kind) if kind else None

    async def rank(self, query: str, passages: list[str]) -> list[tuple[int, float]]:
        """(passage index, logit), best first."""
        if not passages:
            return []
        body = {"model": await self.models.model(), "query": {"text": query},
                "passages": [{"text": p} for p in passages], "truncate": "END"}
        reply = await self.client.post_json("/v1/ranking", body, idempotent=True)
        return [(int(r["index"]), float(r["logit"])) for r in reply["rankings"]]


class LLMClient:
    """The LLM seen by the RAG pipeline: chat, and token counts to fit sources into its context.

    Counts come from the LLM's own `/tokenize` when it has one. A plain OpenAI-compatible endpoint (a NIM, TGI,
    a hosted API) has none: then `fallback_counter` (the embedding tokenizer) counts, with a safety margin,
    and the context is the model card's `max_model_len` or `fallback_context`.
    """

    _PER_MESSAGE_OVERHEAD = 8  # role markers and separators of a chat template, when /tokenize cannot apply it

    def __init__(self, client: ReplicaPool, model: str = "", *,
                 fallback_counter: Callable[[str], int] | None = None, fallback_context: int = 0) -> None:
        self.client = client
        self.models = _ModelDiscovery(client, model)
        self.fallback_counter, self.fallback_context = fallback_counter, fallback_context
        self._max_model_len: int | None = None
        self._chat_tokenize = True
        self._has_tokenize: bool | None = None

    async def context_length(self) -> int:
        if self._max_model_len is None:
            length = (await self.models.card()).get("max_model_len")
            if not length and await self._tokenize_available():
                length = (await self._tokenize({"prompt": "x"})).get("max_model_len")
            if not length:
                length = self.fallback_context or _DEFAULT_CONTEXT
                log.warning("the LLM reports no context length; assuming %d tokens (RETRIEVER_LLM_CONTEXT_LENGTH)",
                            length)
            self._max_model_len = int(length)
        return self._max_model_len

    async def parameters(self) -> int | None:
        """The model's parameter count, when its card says (ours does; a plain OpenAI endpoint may not)."""
        count = (await self.models.card()).get("parameters")
        return int(count) if isinstance(count, int | float) and count > 0 else None

    async def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text (no special tokens), asked concurrently."""
        if not await self._tokenize_available():
            return await asyncio.to_thread(lambda: [self._estimate(t) for t in texts])
        replies = await asyncio.gather(*(self._tokenize({"prompt": t, "add_special_tokens": False}) for t in texts))
        return [_count(reply) for reply in replies]

    async def count_messages(self, messages: list[dict]) -> int:
        """Tokens of a conversation after the chat template; estimated per message if /tokenize takes no messages."""
        if self._chat_tokenize and await self._tokenize_available():
            try:
                return _count(await self._tokenize({"messages": messages}))
            except APIError as exc:
                if exc.status != 400:
                    raise
                self._chat_tokenize = False
        counts = await self.count_tokens([str(m.get("content") or "") for m in messages])
        return sum(counts) + self._PER_MESSAGE_OVERHEAD * (len(messages) + 1)

    async def _tokenize_available(self) -> bool:
        """Whether the LLM has /tokenize; asked once (a dead LLM raises, so the next call asks again)."""
        if self._has_tokenize is None:
            try:
                await self._tokenize({"prompt": "x"})
                self._has_tokenize = True
            except APIError as exc:
                if _status_of(exc) not in _NO_ROUTE:
                    raise
                if self.fallback_counter is None:
                    raise DependencyError(self.client.name, "has no /tokenize and no local tokenizer is set") from exc
                log.warning("the LLM has no /tokenize (HTTP %s); counting tokens with the embedding tokenizer, "
                            "%.2fx", _status_of(exc), _FOREIGN_TOKENIZER_MARGIN)
                self._has_tokenize = False
        return self._has_tokenize

    def _estimate(self, text: str) -> int:
        assert self.fallback_counter is not None
        return math.ceil(self.fallback_counter(text) * _FOREIGN_TOKENIZER_MARGIN)

    async def _tokenize(self, body: dict) -> dict:
        return await self.client.post_json("/tokenize", {"model": await self.models.model(), **body},
                                           idempotent=True)

    async def chat(self, body: dict, affinity: str | None = None) -> dict:
        """`affinity`: requests with the same key go to the same LLM replica (its prefix cache holds their head)."""
        return await self.client.post_json("/v1/chat/completions", {**body, "model": await self.models.model()},
                                           affinity=affinity)

    async def stream_chat(self, body: dict, affinity: str | None = None) -> AsyncIterator[dict]:
        body = {**body, "model": await self.models.model(), "stream": True,
                "stream_options": {"include_usage": True}}
        async for event in self.client.stream_sse("/v1/chat/completions", body, affinity=affinity):
            yield event


def _status_of(exc: APIError) -> int | None:
    """The HTTP status the dependency answered with (a passed-through 4xx keeps its own)."""
    if isinstance(exc, DependencyError):
        return exc.upstream_status
    return exc.status


def _count(reply: dict) -> int:
    return int(reply["count"]) if "count" in reply else len(reply.get("tokens", []))


def dependency_status(exc: Exception) -> str:
    if isinstance(exc, APIError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"
