"""Prometheus metrics at `/v1/metrics` and `/metrics`, one registry per app so tests can build many apps."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def metrics_router(registry: CollectorRegistry) -> APIRouter:
    router = APIRouter()

    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    router.add_api_route("/v1/metrics", metrics, methods=["GET"], include_in_schema=False)
    router.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    return router


def install_http_metrics(app: FastAPI, registry: CollectorRegistry, service: str) -> None:
    """Count and time every HTTP request by route and status."""
    requests = Counter(f"{service}_http_requests", "HTTP requests by route and status",
                       ["method", "route", "status"], registry=registry)
    latency = Histogram(f"{service}_http_request_duration_seconds", "HTTP request latency",
                        ["method", "route"], buckets=LATENCY_BUCKETS, registry=registry)

    @app.middleware("http")
    async def _observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        requests.labels(request.method, path, str(response.status_code)).inc()
        latency.labels(request.method, path).observe(time.perf_counter() - start)
        return response
