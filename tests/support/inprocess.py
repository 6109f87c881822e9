"""Serve an ASGI app with a real uvicorn server on loopback, in a thread of the test process.

For tests that must reach the app's own objects (hold its store lock, say) while talking to it over HTTP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.types import ASGIApp

from tests.support.processes import free_port


@contextmanager
def serve_in_thread(app: ASGIApp, timeout: float = 120.0) -> Iterator[str]:
    """Yields the base URL once the server (and the app's lifespan start-up) is up; stops it on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"in-process server on port {port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
