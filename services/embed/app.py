"""HTTP routes of the embed service: `/v1/embeddings` plus the common health, metrics and `/v1/models`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from common.health import Readiness
from common.schemas.embeddings import EmbeddingRequest, EmbeddingResponse
from common.service import create_app
from services.embed.engine import EmbeddingEngine, EncoderLoader, load_encoder
from services.embed.settings import EmbedSettings


def build_app(settings: EmbedSettings, loader: EncoderLoader = load_encoder) -> FastAPI:
    readiness, registry = Readiness(), CollectorRegistry()
    engine = EmbeddingEngine(settings, readiness, registry, loader)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start_loading()
        try:
            yield
        finally:
            engine.stop()

    app = create_app(title="Embedding service", service="embed", settings=settings, readiness=readiness,
                     registry=registry, models=engine.model_cards, lifespan=lifespan)
    app.state.engine = engine

    @app.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def create_embeddings(request: EmbeddingRequest) -> JSONResponse:
        # Built as plain dicts: validating thousands of floats through pydantic would cost more than the model.
        return JSONResponse(await engine.embed(request))

    return app
