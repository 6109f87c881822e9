"""The web playground: the static single-page app in `static/`, served at `/` and `/ui/` with a strict CSP.

The page and its assets hold no data, so they are served without the API key; the page asks for the key and
sends it on every API call (see static/js/api.js).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).with_name("static")

# Our own origin only: no inline script or style, no eval, no plugins, no framing, no other host for anything.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "font-src 'self'",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (ETag) so an upgraded server never runs a stale page
}


class _PlaygroundFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_playground(app: FastAPI) -> None:
    """`/` is the page, `/ui/...` its scripts and styles; both open without the API key."""
    app.mount("/ui", _PlaygroundFiles(directory=STATIC_DIR), name="playground")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=SECURITY_HEADERS)

    app.state.public_paths = (*app.state.public_paths, "/", "/ui/*")
