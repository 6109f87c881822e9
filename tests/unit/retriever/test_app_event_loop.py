"""The retriever's event loop keeps serving while a long write holds the store lock (routes call it in threads)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx

from services.retriever.app import build_app
from services.retriever.settings import RetrieverSettings
from tests.support.inprocess import serve_in_thread
from tests.support.processes import free_port


def test_a_held_store_lock_freezes_neither_health_nor_the_event_loop(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # no dependency is needed for collections
    app = build_app(RetrieverSettings(data_dir=tmp_path, embed_url=dead, rerank_url=dead, llm_url=dead))
    with serve_in_thread(app) as url:
        assert httpx.post(url + "/v1/collections", json={"name": "docs"}, timeout=60).status_code == 200
        store = app.state.knowledge_base.vectors.store  # the local backend's SQLite store
        replies: dict[str, httpx.Response] = {}

        def call(path: str) -> None:
            replies[path] = httpx.get(url + path, timeout=120)

        waiting = [threading.Thread(target=call, args=(path,)) for path in ("/v1/collections", "/v1/collections/docs")]
        with store.lock:  # what a long ingestion or a slow disk does to every other store call
            for thread in waiting:
                thread.start()
            time.sleep(0.5)  # orders the calls: they reach the lock first (nothing here is timed)
            live = httpx.get(url + "/v1/health/live", timeout=15)
            ready = httpx.get(url + "/v1/health/ready", timeout=15)
            assert live.status_code == 200 and ready.status_code == 200
            assert all(thread.is_alive() for thread in waiting)  # still queued on the lock, not on the loop
        for thread in waiting:
            thread.join(60)
        assert replies["/v1/collections"].json()["collections"][0]["name"] == "docs"
        assert replies["/v1/collections/docs"].status_code == 200
