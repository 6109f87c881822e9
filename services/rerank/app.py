"""Rerank routes: `POST /v1/ranking` (NIM) and `POST /v1/rerank` (Cohere/Jina), plus the common frame."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from common.errors import APIError, not_found
from common.health import Readiness
from common.model_files import bundled_llm, resolve_model
from common.schemas.ranking import (
    Ranking,
    RankingRequest,
    RankingResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
)
from common.service import ModelCard, create_app
from services.rerank.reranker import RankedPassages, Reranker
from services.rerank.scorers import load_scorer, resolve_device
from services.rerank.settings import RerankSettings

log = logging.getLogger(__name__)


def build_app(settings: RerankSettings) -> FastAPI:
    model_path = resolve_model(settings.model, bundled_llm() if not settings.model else None)
    model_id = Path(model_path).name
    readiness = Readiness()
    registry = CollectorRegistry()
    loaded: dict[str, Reranker] = {}

    def load() -> None:
        try:
            scorer = load_scorer(model_path, settings.scorer, resolve_device(settings.device), settings.max_length)
            reranker = Reranker(scorer, registry, max_batch_size=settings.max_batch_size,
                                max_batch_tokens=settings.max_batch_tokens, max_queue=settings.max_queue)
            reranker.start()
        except Exception as exc:
            log.exception("loading the reranker from %s failed", model_path)
            readiness.set_not_ready(f"model failed to load: {type(exc).__name__}: {exc}")
            return
        loaded["reranker"] = reranker
        readiness.details = {"scorer": scorer.kind, "max_length": scorer.max_length}
        readiness.set_ready()
        log.info("serving %s as %r with the %s scorer (max %d tokens per pair)", model_path, model_id,
                 scorer.kind, scorer.max_length)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="rerank-loader", daemon=True).start()
        yield
        if "reranker" in loaded:
            loaded["reranker"].stop()

    def models() -> list[ModelCard]:
        return [ModelCard(id=model_id, metadata={"scorer": readiness.details.get("scorer", settings.scorer)})]

    app = create_app(title="rerank", service="rerank", settings=settings, readiness=readiness, registry=registry,
                     models=models, lifespan=lifespan)

    async def rank(model: str | None, query: str, passages: list[str], truncate: bool) -> RankedPassages:
        if model is not None and model not in (model_id, model_path):
            raise not_found(f"model {model!r} is not served here; this server serves {model_id!r}", param="model")
        if len(passages) > settings.max_passages:
            raise APIError(413, f"{len(passages)} passages in one request, over the limit of "
                                f"{settings.max_passages}", param="passages")
        if "reranker" not in loaded:
            raise APIError(503, f"the reranker is not ready: {readiness.message}")
        return await loaded["reranker"].rank(query, passages, truncate)

    @app.post("/v1/ranking")
    async def ranking(request: RankingRequest) -> RankingResponse:
        ranked = await rank(request.model, request.query.text, [p.text for p in request.passages],
                            request.truncate == "END")
        order = sorted(range(len(ranked.logits)), key=lambda i: -ranked.logits[i])
        return RankingResponse(rankings=[Ranking(index=i, logit=ranked.logits[i]) for i in order])

    @app.post("/v1/rerank", response_model_exclude_none=True)
    async def rerank(request: RerankRequest) -> RerankResponse:
        texts = request.texts
        ranked = await rank(request.model, request.query, texts, request.truncate == "END")
        order = sorted(range(len(texts)), key=lambda i: -ranked.logits[i])[: request.top_n]
        relevance = loaded["reranker"].scorer.relevance
        results = [RerankResult(index=i, relevance_score=relevance(ranked.logits[i]),
                                document=RerankDocument(text=texts[i]) if request.return_documents else None)
                   for i in order]
        return RerankResponse(model=model_id, results=results, usage=RerankUsage(total_tokens=ranked.total_tokens))

    return app
