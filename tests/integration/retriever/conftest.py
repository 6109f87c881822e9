from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[3]


def _require(service: str) -> None:
    if not (ROOT / "services" / service / "__main__.py").exists():
        pytest.skip(f"services/{service} has no entry point yet")


@pytest.fixture(scope="module")
def embed_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    _require("embed")
    process = ServiceProcess("embed", env={"HF_HUB_OFFLINE": "1"}, log_dir=tmp_path_factory.mktemp("logs"))
    process.start().wait_ready()
    yield process
    process.stop()


# The suites that take this fixture run once per vector store: SQLite + FAISS, and Milvus (milvus-lite, the embedded
# Milvus engine, in a file under the data dir).
VECTOR_STORES = ["local", "milvus"]


@pytest.fixture(scope="module", params=VECTOR_STORES)
def vector_store(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def retriever_env(data_dir: Path, embed_url: str, vector_store: str = "local") -> dict[str, str]:
    # Rerank and LLM point at ports nobody listens on: they are "down" unless a test says otherwise.
    return {"RETRIEVER_DATA_DIR": str(data_dir), "RETRIEVER_EMBED_URL": embed_url, "HF_HUB_OFFLINE": "1",
            "RETRIEVER_VECTOR_STORE": vector_store,
            "RETRIEVER_RERANK_URL": f"http://127.0.0.1:{free_port()}",
            "RETRIEVER_LLM_URL": f"http://127.0.0.1:{free_port()}", "RETRIEVER_EMBED_TIMEOUT": "20",
            "TOKENIZERS_PARALLELISM": "false", **{k: v for k, v in os.environ.items() if k == "API_KEY"}}
