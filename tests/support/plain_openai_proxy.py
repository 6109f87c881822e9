"""Our LLM server seen as a plain OpenAI-compatible endpoint (a NIM, TGI or hosted API would look like this).

A reverse proxy: `/tokenize` and `/detokenize` answer 404, `/v1/models` loses `max_model_len`, and everything
else is forwarded as it is (streams included). A chat request whose last message contains HOLD is held until
the proxy stops, which is how a hung LLM looks to its client.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

HOLD = "HOLD"


def plain_openai_proxy(upstream: str) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=600)
    released = asyncio.Event()  # never set: a held request waits until it is cancelled

    async def models(_: Request) -> JSONResponse:
        listing = (await client.get("/v1/models")).json()
        for card in listing["data"]:
            card.pop("max_model_len", None)
        return JSONResponse(listing)

    async def no_route(_: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": "Not Found", "type": "not_found_error", "param": None,
                                       "code": 404}}, status_code=404)

    async def forward(request: Request) -> Response:
        body = await request.body()
        messages = json.loads(body or b"{}").get("messages") or [{}]
        if HOLD in str(messages[-1].get("content", "")):
            await released.wait()
        upstream_request = client.build_request(request.method, request.url.path, content=body,
                                                headers={"content-type": "application/json"})
        reply = await client.send(upstream_request, stream=True)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for piece in reply.aiter_raw():
                    yield piece
            finally:
                await reply.aclose()

        return StreamingResponse(relay(), status_code=reply.status_code,
                                 media_type=reply.headers.get("content-type"))

    return Starlette(routes=[Route("/v1/models", models), Route("/tokenize", no_route, methods=["POST"]),
                             Route("/detokenize", no_route, methods=["POST"]),
                             Route("/v1/chat/completions", forward, methods=["POST"]),
                             Route("/v1/health/ready", forward), Route("/v1/health/live", forward)])
