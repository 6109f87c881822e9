"""The embed app in-process: unready (503) while the model loads, live throughout; --help lists settings."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from fastapi.testclient import TestClient

from services.embed.app import build_app
from services.embed.encoder import Encoder
from services.embed.engine import load_encoder
from services.embed.settings import EmbedSettings
from tests.support.processes import ROOT


def test_ready_is_503_until_the_model_has_loaded() -> None:
    release = threading.Event()

    def slow_loader(settings: EmbedSettings, model: str) -> Encoder:
        release.wait(30)
        return load_encoder(settings, model)

    with TestClient(build_app(EmbedSettings(device="cpu"), loader=slow_loader)) as client:
        assert client.get("/v1/health/live").status_code == 200
        ready = client.get("/v1/health/ready")
        assert ready.status_code == 503 and ready.json()["ready"] is False
        refused = client.post("/v1/embeddings", json={"input": "x"})
        assert refused.status_code == 503
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        release.set()
        deadline = time.monotonic() + 60
        while client.get("/v1/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/v1/health/ready").json()["ready"] is True
        assert len(client.post("/v1/embeddings", json={"input": "x"}).json()["data"][0]["embedding"]) == 384


def test_openapi_documents_the_embeddings_route() -> None:
    schema = build_app(EmbedSettings()).openapi()
    assert "/v1/embeddings" in schema["paths"]
    assert "EmbeddingRequest" in schema["components"]["schemas"]


def test_help_lists_every_setting() -> None:
    out = subprocess.run([sys.executable, "-m", "services.embed", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for env in ("EMBED_PORT", "EMBED_MODEL", "EMBED_DEVICE", "EMBED_DTYPE", "EMBED_CPU_ATTENTION",
                "EMBED_MAX_BATCH_SIZE", "EMBED_MAX_BATCH_TOKENS", "EMBED_MAX_QUEUE", "EMBED_MAX_INPUTS_PER_REQUEST",
                "EMBED_QUERY_PREFIX", "EMBED_PASSAGE_PREFIX", "API_KEY"):
        assert env in out, env
    assert "8001" in out


def test_tokenizing_runs_off_the_event_loop() -> None:
    import asyncio

    from prometheus_client import CollectorRegistry

    from common.health import Readiness
    from common.schemas.embeddings import EmbeddingRequest
    from services.embed.engine import EmbeddingEngine

    entered, release = threading.Event(), threading.Event()
    released_while_tokenizing: list[bool] = []

    class GatedEncoder(Encoder):
        """The real encoder; tokenize waits until the event loop, still free, lets it go."""

        def tokenize(self, texts, truncate="NONE"):  # type: ignore[no-untyped-def]
            entered.set()
            released_while_tokenizing.append(release.wait(15))
            return super().tokenize(texts, truncate)

    settings = EmbedSettings(device="cpu")
    engine = EmbeddingEngine(settings, Readiness(), CollectorRegistry(),
                             loader=lambda s, model: GatedEncoder.load(model, "cpu"))
    engine.load()

    async def main() -> dict:
        request = asyncio.create_task(engine.embed(EmbeddingRequest(input=["a long document"])))
        while not entered.is_set():  # the loop must keep turning while the input is tokenized
            await asyncio.sleep(0.01)
        release.set()
        return await request

    try:
        reply = asyncio.run(main())
    finally:
        engine.stop()
    assert released_while_tokenizing == [True]
    assert len(reply["data"][0]["embedding"]) == 384
