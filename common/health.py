"""Liveness and readiness: `/v1/health/live` answers while the process runs, `/ready` once the service says so."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import APIRouter
from fastapi.responses import JSONResponse


@dataclass(slots=True)
class Readiness:
    """Set by the service when its model is loaded and its engine serves; cleared if it dies."""

    ready: bool = False
    message: str = "loading"
    details: dict[str, object] = field(default_factory=dict)

    def set_ready(self) -> None:
        self.ready, self.message = True, "ready"

    def set_not_ready(self, message: str) -> None:
        self.ready, self.message = False, message


def health_router(readiness: Readiness) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/health/live", include_in_schema=False)
    async def live() -> dict:
        return {"object": "health.response", "message": "live", "live": True}

    @router.get("/v1/health/ready", include_in_schema=False)
    async def ready() -> JSONResponse:
        body: dict[str, object] = {"object": "health.response", "message": readiness.message,
                                   "ready": readiness.ready}
        if readiness.details:
            body["details"] = readiness.details
        return JSONResponse(body, status_code=200 if readiness.ready else 503)

    return router
