"""Whether this process runs Triton kernels in the CPU interpreter (chosen by `tests/conftest.py` without a GPU)."""

from __future__ import annotations

import pytest
from triton.runtime.interpreter import InterpretedFunction

from services.llm.kernels import attention_triton

requires_interpreter = pytest.mark.skipif(
    not isinstance(attention_triton._decode_split_kernel, InterpretedFunction),
    reason="Triton kernels are compiled for the GPU in this process; tests/gpu checks them there",
)
