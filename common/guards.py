"""ASGI guards in front of every route: bearer-key auth and a request body size limit.

Both are pure ASGI so they never buffer a streaming response.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import APIError, error_body

OPEN_PATHS = ("/v1/health/live", "/v1/health/ready")


async def _send_error(send: Send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    """Every route but health, and the `public` paths a service names, needs `Authorization: Bearer <api_key>`.

    A public entry ending in `/*` opens everything under that prefix (static files that hold no data). The
    scheme may be in any case. The key is compared timing-safely: both sides are hashed to 32 bytes first, so
    neither the key's bytes nor its length can be learned from how long a refusal takes.
    """

    def __init__(self, app: ASGIApp, api_key: str, public: tuple[str, ...] = ()) -> None:
        self.app, self.expected = app, _digest(api_key.encode())
        self.open_paths = {*OPEN_PATHS, *(p for p in public if not p.endswith("/*"))}
        self.open_prefixes = tuple(p[:-1] for p in public if p.endswith("/*"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope["path"]):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = given.partition(b" ")
        valid = hmac.compare_digest(_digest(key.strip()), self.expected)
        if scheme.lower() != b"bearer" or not valid:
            message = "missing API key" if not given else "invalid API key"
            return await _send_error(send, 401, message, [(b"www-authenticate", b"Bearer")])
        await self.app(scope, receive, send)

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)


class BodyTooLarge(APIError):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {max_bytes} bytes")


class BodySizeLimit:
    """Rejects bodies over `max_bytes` with 413, by Content-Length or, for chunked bodies, while reading them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                return await _send_error(send, 413, BodyTooLarge(self.max_bytes).message)
            return await self.app(scope, receive, send)  # the server holds the body to its declared length
        # No Content-Length: read the body here (at most max_bytes). Raising from inside the app's own read
        # does not work: FastAPI turns errors there (wrapped in an ExceptionGroup by middleware) into a 400.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its whole body
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.max_bytes:
                return await _send_error(send, 413, BodyTooLarge(self.max_bytes).message)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()
