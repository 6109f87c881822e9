"""Property-based requests generated from the embed service's own OpenAPI schema: none may get a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings, strategies

from tests.support.processes import ServiceProcess


@pytest.fixture(scope="module")
def embed_schema() -> schemathesis.BaseSchema:
    process = ServiceProcess("embed", env={"HF_HUB_OFFLINE": "1", "EMBED_LOG_LEVEL": "warning"}).start()
    try:
        process.wait_ready()
        yield schemathesis.openapi.from_url(process.url + "/openapi.json")
    finally:
        process.stop()


@given(data=strategies.data())
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_never_get_a_server_error(embed_schema: schemathesis.BaseSchema,
                                                     data: strategies.DataObject) -> None:
    # Drawn inside the test: schemathesis' own pytest plugin needs the schema before the server exists.
    case = data.draw(embed_schema["/v1/embeddings"]["POST"].as_strategy())
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.body, response.text)
    if response.status_code >= 400:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
