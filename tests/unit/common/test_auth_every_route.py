"""Security: with API_KEY set, every route of every service but health needs the key, compared timing-safely."""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from common.guards import OPEN_PATHS
from common.service import guarded
from common.settings import ServiceSettings

KEY = "s3cret-key"


def _embed(tmp: Path) -> tuple[FastAPI, ServiceSettings]:
    from services.embed.app import build_app
    from services.embed.settings import EmbedSettings

    settings = EmbedSettings(api_key=KEY)
    return build_app(settings), settings


def _rerank(tmp: Path) -> tuple[FastAPI, ServiceSettings]:
    from services.rerank.app import build_app
    from services.rerank.settings import RerankSettings

    settings = RerankSettings(api_key=KEY)
    return build_app(settings), settings


def _llm(tmp: Path) -> tuple[FastAPI, ServiceSettings]:
    from services.llm.app import build_app
    from services.llm.settings import LLMSettings

    settings = LLMSettings(api_key=KEY)
    return build_app(settings), settings


def _retriever(tmp: Path) -> tuple[FastAPI, ServiceSettings]:
    from services.retriever.app import build_app
    from services.retriever.settings import RetrieverSettings

    settings = RetrieverSettings(api_key=KEY, data_dir=tmp)
    return build_app(settings), settings


SERVICES = {"embed": _embed, "rerank": _rerank, "llm": _llm, "retriever": _retriever}


def _routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app serves, path parameters filled in."""
    found = []
    for route in app.routes:
        path = re.sub(r"\{[^}]+\}", "x", getattr(route, "path", ""))
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD":
                found.append((method, path))
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_every_route_but_health_needs_the_key(service: str, tmp_path: Path) -> None:
    app, settings = SERVICES[service](tmp_path)
    routes = _routes(app)
    assert len(routes) >= 6, routes  # health, metrics, models, docs... and the service's own
    client = TestClient(guarded(app, settings), raise_server_exceptions=False)  # no lifespan: nothing loads
    public = tuple(app.state.public_paths)  # a service's static pages, open by design (they hold no data)
    for method, path in routes:
        if path in OPEN_PATHS or path in public or path.startswith(tuple(p[:-1] for p in public if p.endswith("*"))):
            assert client.request(method, path).status_code != 401, path
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
            reply = client.request(method, path, headers=headers)
            assert reply.status_code == 401, (method, path, headers, reply.status_code)
            assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
        allowed = client.request(method, path, headers={"Authorization": f"bearer {KEY}"})
        assert allowed.status_code != 401, (method, path)
    # A route that does not exist is refused before it is looked up: no route map for the unauthenticated.
    assert client.get("/v1/no-such-route").status_code == 401


def test_the_key_is_compared_timing_safely_on_fixed_length_digests(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    compared: list[tuple[int, int]] = []
    real: Callable[[bytes, bytes], bool] = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    app, settings = _embed(tmp_path)
    client = TestClient(guarded(app, settings), raise_server_exceptions=False)
    for given in ("", "Bearer x", "Bearer " + "y" * 500, f"Bearer {KEY[:-1]}", f"Bearer {KEY}"):
        client.get("/v1/models", headers={"Authorization": given} if given else {})
    # Every decision went through hmac.compare_digest, always on two 32-byte digests: how long a refusal
    # takes tells nothing about how much of the key, or its length, a guess got right.
    assert compared == [(32, 32)] * 5
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
