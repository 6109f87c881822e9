"""The one HTTP client services use to talk to each other: timeouts, bounded retries, typed errors."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from common.errors import APIError

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {429, 502, 503, 504}


class DependencyError(APIError):
    """A dependency (embed, rerank, llm...) is down, slow, or answered with an error; 503 by default."""

    def __init__(self, dependency: str, reason: str, status: int = 503, upstream_status: int | None = None) -> None:
        super().__init__(status, f"{dependency} unavailable: {reason}", code="dependency_unavailable"
                         if status == 503 else status)
        self.dependency = dependency
        self.upstream_status = upstream_status  # the HTTP status the dependency answered with, if it answered


class ServiceClient:
    """Async JSON client for one dependency.

    Idempotent calls (GET, and POSTs the caller marks `idempotent=True`, such as embeddings) are retried
    on connection errors and 429/5xx-gateway answers with exponential backoff; others fail fast.
    """

    def __init__(self, name: str, base_url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 connect_timeout: float = 3.0, retries: int = 2, backoff: float = 0.25) -> None:
        self.name, self.base_url = name, base_url.rstrip("/")
        self.retries, self.backoff = retries, backoff
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                       timeout=httpx.Timeout(timeout, connect=connect_timeout))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def get_json(self, path: str, **params: Any) -> Any:
        response = await self._request("GET", path, idempotent=True, params=params or None)
        return response.json()

    async def post_json(self, path: str, body: dict, *, idempotent: bool = False) -> Any:
        response = await self._request("POST", path, idempotent=idempotent, json=body)
        return response.json()

    async def stream_sse(self, path: str, body: dict) -> AsyncIterator[dict]:
        """POST and yield each `data:` JSON event of a server-sent-event stream until `[DONE]`."""
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise self._error_from(response)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.TransportError as exc:
            raise DependencyError(self.name, _describe(exc)) from exc

    async def is_ready(self) -> bool:
        try:
            response = await self._http.get("/v1/health/ready", timeout=2.0)
        except httpx.TransportError:
            return False
        return response.status_code == 200

    async def _request(self, method: str, path: str, *, idempotent: bool, **kwargs: Any) -> httpx.Response:
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if last:
                    raise DependencyError(self.name, _describe(exc)) from exc
                log.warning("%s %s %s failed (%s), retrying", self.name, method, path, _describe(exc))
            else:
                if response.status_code < 400:
                    return response
                if last or response.status_code not in _RETRYABLE_STATUS:
                    raise self._error_from(response)
                log.warning("%s %s %s answered %d, retrying", self.name, method, path, response.status_code)
            await asyncio.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _error_from(self, response: httpx.Response) -> APIError:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300] or response.reason_phrase
        if response.status_code in (400, 404, 413):
            # The caller's input was refused downstream: pass the 4xx through, naming who refused it.
            return APIError(response.status_code, f"{self.name}: {message}")
        return DependencyError(self.name, f"HTTP {response.status_code}: {message}",
                               upstream_status=response.status_code)


def _describe(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    return f"{type(exc).__name__}: {exc}"
