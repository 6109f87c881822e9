"""The retriever's embedding client against a real embed service: base64 vectors, several requests in flight,
rows in the order of the texts, equal to sentence-transformers."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from common.http import ServiceClient
from common.model_files import bundled_embedding_model
from services.retriever.dependencies import EmbeddingClient
from tests.support.processes import ServiceProcess

TEXTS = [f"Claim {i}: " + "the spike protein binds the ACE2 receptor on epithelial cells. " * (1 + i % 7)
         for i in range(23)]


@pytest.mark.parametrize(("batch_size", "concurrency"), [(4, 3), (64, 1), (1, 8)])
def test_rows_follow_the_texts_across_concurrent_batches(embed_process: ServiceProcess, batch_size: int,
                                                         concurrency: int) -> None:
    async def embed() -> np.ndarray:
        client = ServiceClient("embed", embed_process.url)
        try:
            return await EmbeddingClient(client, batch_size=batch_size, concurrency=concurrency).embed(
                TEXTS, input_type="passage")
        finally:
            await client.aclose()

    vectors = asyncio.run(embed())
    expected = SentenceTransformer(str(bundled_embedding_model()), device="cpu").encode(
        TEXTS, normalize_embeddings=True)
    assert vectors.dtype == np.float32 and vectors.shape == expected.shape
    similarity = vectors @ expected.T
    assert np.all(np.diag(similarity) >= 0.999)
    assert np.array_equal(similarity.argmax(axis=1), np.arange(len(TEXTS)))  # each row is its own text's
