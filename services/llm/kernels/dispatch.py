"""Whether a tensor should go to a Triton kernel or to the torch reference.

Triton for CUDA tensors when triton imports; `LLM_DISABLE_TRITON=1` forces the references everywhere
(the engine's reference run in the GPU equivalence test uses it). Inside a `triton_everywhere()` block,
tensors on any device go to Triton: CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, the tests
that run the whole engine through the kernels without a GPU) and `meta` tensors while launches are recorded
dry (`launches.record(dry=True)`). Production CPU serving never enters that block and keeps the references.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

_everywhere = False


@functools.cache
def triton_available() -> bool:
    if os.environ.get("LLM_DISABLE_TRITON") == "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton_on(device: torch.device) -> bool:
    return triton_available() and (device.type == "cuda" or _everywhere)


def use_triton(tensor: torch.Tensor) -> bool:
    return use_triton_on(tensor.device)


@contextlib.contextmanager
def triton_everywhere() -> Iterator[None]:
    """Routes tensors on every device to the Triton kernels for the duration of the block."""
    global _everywhere
    assert triton_available(), "triton is not importable (or LLM_DISABLE_TRITON=1)"
    previous, _everywhere = _everywhere, True
    try:
        yield
    finally:
        _everywhere = previous
