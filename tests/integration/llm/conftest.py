"""One real LLM server process (bundled SmolLM2 GGUF) shared by the LLM server tests."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from tests.support.processes import ServiceProcess

# fp32 even where the CPU would pick bf16: these tests compare answers across batch compositions, and bf16
# GEMMs round differently with the batch's shape (near-tie tokens flip), which says nothing about serving bugs.
SERVER_ENV = {"HF_HUB_OFFLINE": "1", "LLM_MAX_MODEL_LEN": "1024", "LLM_KV_CACHE_GIB": "0.25", "LLM_DTYPE": "float32"}


@pytest.fixture(scope="session")
def llm_server() -> Iterator[ServiceProcess]:
    server = ServiceProcess("llm", env=SERVER_ENV).start()
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_id(llm_server: ServiceProcess) -> str:
    return httpx.get(llm_server.url + "/v1/models").json()["data"][0]["id"]


def read_metrics(url: str) -> dict[str, float]:
    """Unlabelled `llm:` samples from the server's Prometheus text."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {name: float(value) for name, value in re.findall(r"^(llm:[a-z_:]+) (\S+)$", text, re.M)}
