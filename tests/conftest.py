from __future__ import annotations

import os

import pytest
from hypothesis import settings

# `make test` (and so CI) runs with --hypothesis-profile=ci: the same examples on every run, so a random seed never
# decides whether a change lands; no example database and no per-example deadline on a shared, loaded machine.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/unit/llm/kernels); the choice is made when
# triton.language is first imported, which sentence-transformers does at collection, so it must be made here.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests on the service images run last: CI (.ci/run) builds the images in the background meanwhile.
    items.sort(key=lambda item: "images" in item.keywords)
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
