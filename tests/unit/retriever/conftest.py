from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.model_files import bundled_embedding_model
from services.retriever.chunking import Chunker
from services.retriever.knowledge_base import KnowledgeBase

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class InProcessEmbedder:
    """The bundled sentence-transformers model run in-process: real vectors without an embed server."""

    def __init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(bundled_embedding_model()), device="cpu")
        self.calls: list[tuple[int, str]] = []

    async def embed(self, texts: list[str], input_type: str) -> np.ndarray:
        self.calls.append((len(texts), input_type))
        return self.model.encode(texts, batch_size=32, convert_to_numpy=True).astype(np.float32)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def embedder() -> InProcessEmbedder:
    return InProcessEmbedder()


@pytest.fixture(scope="session")
def chunker() -> Chunker:
    return Chunker.from_model_dir(bundled_embedding_model())


@pytest.fixture
def knowledge_base(tmp_path: Path, chunker: Chunker, embedder: InProcessEmbedder) -> Iterator[KnowledgeBase]:
    kb = KnowledgeBase(tmp_path / "data", chunker, embedder, ann_threshold=1000, index_backend="faiss-cpu")  # type: ignore[arg-type]
    yield kb
    kb.close()
