"""common/ errors, guards and settings, through a real app built with `create_app` and `guarded`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, Field
from pydantic_settings import SettingsConfigDict

from common import service
from common.errors import APIError, bad_request
from common.health import Readiness
from common.service import ModelCard, create_app, guarded
from common.settings import ServiceSettings, settings_help

ROOT = Path(__file__).resolve().parents[3]


class Body(BaseModel):
    text: str
    count: int = Field(1, gt=0)


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="DEMO_", extra="ignore", populate_by_name=True)

    threshold: float = Field(0.5, description="how sure to be")


def demo_app(**settings: object) -> TestClient:
    readiness = Readiness()
    app = create_app(title="demo", service="demo", settings=DemoSettings(**settings), readiness=readiness,
                     registry=CollectorRegistry(), models=lambda: [ModelCard("demo-model")])

    @app.post("/v1/echo")
    async def echo(body: Body) -> dict:
        if body.text == "refuse":
            raise bad_request("refused on purpose", param="text")
        if body.text == "busy":
            raise APIError(429, "too busy", code="queue_full")
        if body.text == "bug":
            raise RuntimeError("a bug in /srv/secret-path")
        return {"text": body.text * body.count}

    app.state.readiness_handle = readiness
    return TestClient(guarded(app, DemoSettings(**settings)), raise_server_exceptions=False)


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.fixture(scope="module")
def client() -> TestClient:
    with demo_app() as client:
        yield client


def test_schema_errors_are_400_not_422(client: TestClient) -> None:
    error = error_of(client.post("/v1/echo", json={"text": "a", "count": 0}), 400)
    assert error["param"] == "count" and error["type"] == "invalid_request_error"
    assert error_of(client.post("/v1/echo", json={}), 400)["param"] == "text"


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post("/v1/echo", content=b"{nope", headers={"content-type": "application/json"})
    assert error_of(response, 400)["message"] == "request body is not valid JSON"


def test_api_errors_keep_status_param_and_code(client: TestClient) -> None:
    assert error_of(client.post("/v1/echo", json={"text": "refuse"}), 400)["param"] == "text"
    busy = client.post("/v1/echo", json={"text": "busy"})
    assert error_of(busy, 429)["code"] == "queue_full" and busy.headers["retry-after"] == "1"


def test_unknown_route_and_bug_are_openai_errors(client: TestClient) -> None:
    assert "no route" in error_of(client.get("/v1/nothing"), 404)["message"]
    bug = error_of(client.post("/v1/echo", json={"text": "bug"}), 500)
    assert bug["type"] == "internal_server_error"
    # The exception's text stays in the log: clients learn nothing about the server's insides.
    assert "secret-path" not in bug["message"] and "RuntimeError" not in bug["message"]


def test_health_models_and_metrics(client: TestClient) -> None:
    assert client.get("/v1/health/live").status_code == 200
    assert client.get("/v1/health/ready").status_code == 503
    assert client.get("/v1/models").json()["data"][0]["id"] == "demo-model"
    assert "demo_http_requests_total" in client.get("/metrics").text


def test_body_limit_by_content_length_and_by_stream() -> None:
    with demo_app(max_body_bytes=100) as client:
        assert client.post("/v1/echo", json={"text": "a" * 50}).status_code == 200
        assert "100 bytes" in error_of(client.post("/v1/echo", json={"text": "a" * 200}), 413)["message"]

        def chunks():  # no Content-Length: the limit must hold while the body streams in
            for _ in range(10):
                yield b'{"text": "' + b"a" * 30

        error_of(client.post("/v1/echo", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_bearer_auth_guards_all_but_health() -> None:
    with demo_app(api_key="k1") as client:
        assert client.get("/v1/health/live").status_code == 200
        assert error_of(client.get("/v1/models"), 401)["message"] == "missing API key"
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer k2"})
        assert error_of(wrong, 401)["message"] == "invalid API key"
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200


def test_bearer_auth_leaves_the_apps_public_paths_open() -> None:
    settings = DemoSettings(api_key="k1")
    app = create_app(title="demo", service="demo", settings=settings, readiness=Readiness(),
                     registry=CollectorRegistry(), models=lambda: [])
    for path in ("/", "/ui/app.js", "/uix"):
        app.add_api_route(path, lambda: {"ok": True}, methods=["GET"])
    app.state.public_paths = ("/", "/ui/*")
    with TestClient(guarded(app, settings)) as client:
        assert client.get("/").status_code == 200
        assert client.get("/ui/app.js").status_code == 200
        assert error_of(client.get("/uix"), 401)  # a prefix opens only what is under it
        assert error_of(client.get("/v1/models"), 401)


def test_settings_read_prefixed_env_and_unprefixed_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_PORT", "9123")
    monkeypatch.setenv("DEMO_THRESHOLD", "0.75")
    monkeypatch.setenv("API_KEY", "shared")
    settings = DemoSettings()
    assert (settings.port, settings.threshold, settings.api_key) == (9123, 0.75, "shared")


def test_settings_help_lists_env_vars_with_defaults() -> None:
    text = settings_help(DemoSettings, "demo").format_help()
    for line in ("DEMO_HOST", "DEMO_PORT", "DEMO_THRESHOLD", "API_KEY", "DEMO_MAX_BODY_BYTES"):
        assert line in text
    assert "[default: 0.5]" in text


def run_demo_service(monkeypatch: pytest.MonkeyPatch, environ: dict[str, str]) -> dict[str, str | None]:
    """`run_service` up to serving, with `environ` as the process environment; what the app builder saw."""
    seen: dict[str, str | None] = {}

    def builder():
        seen["GOMP_SPINCOUNT"] = os.environ.get("GOMP_SPINCOUNT")
        return lambda settings: FastAPI()

    monkeypatch.setattr(os, "environ", environ)
    monkeypatch.setattr(sys, "argv", ["demo"])
    monkeypatch.setattr(service, "serve", lambda app, settings: None)
    service.run_service(DemoSettings, "demo", builder)
    return seen


def test_openmp_threads_spin_briefly_unless_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    base = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    assert run_demo_service(monkeypatch, dict(base)) == {"GOMP_SPINCOUNT": str(service.OPENMP_SPIN_COUNT)}
    assert run_demo_service(monkeypatch, base | {"GOMP_SPINCOUNT": "300000"}) == {"GOMP_SPINCOUNT": "300000"}


@pytest.mark.parametrize("name", ["llm", "embed", "rerank", "retriever"])
def test_no_service_loads_torch_before_its_app_builder(name: str) -> None:
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: it must still be unloaded when run_service sets it."""
    code = f"import sys, services.{name}.__main__; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
