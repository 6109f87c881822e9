"""The frame every service app is built in: errors, health, metrics, auth, body limit, `/v1/models`.

A service builds its core, then `create_app(...)` and adds its own routes to the returned FastAPI app.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp

from common.errors import install_error_handlers
from common.gpu_memory import cap_gpu_memory
from common.guards import BearerAuth, BodySizeLimit
from common.health import Readiness, health_router
from common.metrics import install_http_metrics, metrics_router
from common.settings import ServiceSettings, settings_help

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]

# How long torch's OpenMP threads (GNU libgomp) spin at a barrier before they sleep, unless the environment says.
# libgomp's own default is 300,000 spins; when another process keeps one of the cores busy (a load generator, the
# retriever beside the embed service), every parallel region then waits for spinning threads to be descheduled.
# Measured on a 2-vCPU AMX Xeon with one core kept busy: a 32-sequence decode step of the bundled LLM took 162-219
# ms at the default and 85-97 ms at 1,000 spins; on an idle machine 55-57 against 57-60 ms, prefills unchanged.
OPENMP_SPIN_COUNT = 1000


@dataclass(slots=True)
class ModelCard:
    """One entry of `/v1/models`."""

    id: str
    owned_by: str = "rag-platform"
    created: int = field(default_factory=lambda: int(time.time()))
    metadata: dict[str, object] = field(default_factory=dict)

    def as_openai(self) -> dict:
        card: dict[str, object] = {"id": self.id, "object": "model", "created": self.created,
                                   "owned_by": self.owned_by}
        card.update(self.metadata)
        return card


def create_app(*, title: str, service: str, settings: ServiceSettings, readiness: Readiness,
               registry: CollectorRegistry, models: Callable[[], list[ModelCard]],
               lifespan: Lifespan | None = None) -> FastAPI:
    app = FastAPI(title=title, lifespan=lifespan)
    install_error_handlers(app)
    install_http_metrics(app, registry, service)
    app.include_router(health_router(readiness))
    app.include_router(metrics_router(registry))

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [card.as_openai() for card in models()]}

    app.state.readiness = readiness
    app.state.registry = registry
    app.state.public_paths = ()  # paths served without the API key besides health (see `guarded`)
    return app


def guarded(app: FastAPI, settings: ServiceSettings) -> ASGIApp:
    """The app wrapped in the body-size limit and, when `API_KEY` is set, bearer auth.

    Health and the app's `state.public_paths` stay open (`"/ui/*"` opens a whole prefix).
    """
    wrapped: ASGIApp = BodySizeLimit(app, settings.max_body_bytes)
    if settings.api_key:
        wrapped = BearerAuth(wrapped, settings.api_key, public=tuple(getattr(app.state, "public_paths", ())))
    return wrapped


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve(app: FastAPI, settings: ServiceSettings) -> None:
    """Run the guarded app under uvicorn until SIGINT/SIGTERM; shutdown runs the app's lifespan exit."""
    uvicorn.run(guarded(app, settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=30)


def run_service(settings_cls: type[ServiceSettings], description: str,
                app_builder: Callable[[], Callable[[ServiceSettings], FastAPI]]) -> None:
    """The whole `python -m services.<name>` entry point: --help, settings from env, logging, serve.

    `app_builder` returns the service's `build_app`; it is called after --help so that listing the settings
    never waits for the service's heavy imports (torch, transformers).
    """
    settings_help(settings_cls, description).parse_args()
    # libgomp reads this once, when torch loads it: before `app_builder` imports torch.
    os.environ.setdefault("GOMP_SPINCOUNT", str(OPENMP_SPIN_COUNT))
    settings = settings_cls()
    configure_logging(settings.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per dependency call drowns what matters
    if settings.caps_gpu_allocator:
        cap_gpu_memory(settings.gpu_memory_utilization)
    serve(app_builder()(settings), settings)
