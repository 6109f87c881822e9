"""Requests generated from the embed service's own OpenAPI schema: no 5xx, every error in the OpenAI shape."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.fuzz import fuzz_schema, load_schema
from tests.support.processes import ServiceProcess


@pytest.fixture(scope="module")
def embed_server() -> Iterator[ServiceProcess]:
    with ServiceProcess("embed", env={"HF_HUB_OFFLINE": "1", "EMBED_LOG_LEVEL": "warning"}) as process:
        yield process.wait_ready()


def test_generated_requests_get_no_server_error_and_clear_client_errors(embed_server: ServiceProcess) -> None:
    operations, findings = fuzz_schema(load_schema(embed_server.url), embed_server.url, max_examples=40)
    assert {"POST /v1/embeddings", "GET /v1/models"} <= set(operations)
    assert not findings, findings
