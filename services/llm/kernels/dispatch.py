"""Whether a tensor should go to a Triton kernel or to the torch reference.

Triton for CUDA tensors when triton imports; `LLM_DISABLE_TRITON=1` forces the references everywhere
(the engine's reference run in the GPU equivalence test uses it).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    if os.environ.get("LLM_DISABLE_TRITON") == "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and triton_available()
