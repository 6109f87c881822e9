from __future__ import annotations

import gc

import pytest


@pytest.fixture(autouse=True)
def release_device_memory():
    """An engine's parts refer to each other, so only the cycle collector frees a finished test's GPU memory:
    collect it before the next test sizes anything from what is free."""
    yield
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
