"""What the embed service sends (its `encode_vector`) is what the retriever's client reads back."""

from __future__ import annotations

import numpy as np

from services.embed.engine import encode_vector
from services.retriever.dependencies import decode_embedding


def test_base64_and_float_lists_decode_to_the_same_float32_vector() -> None:
    vector = np.random.default_rng(7).standard_normal(384).astype(np.float32)
    from_base64 = decode_embedding(encode_vector(vector, "base64"))
    from_floats = decode_embedding(encode_vector(vector, "float"))
    assert from_base64.dtype == from_floats.dtype == np.float32
    assert np.array_equal(from_base64, vector) and np.array_equal(from_floats, vector)
