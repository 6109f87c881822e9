"""The AMX decode matmul (`matmul_cpu.c`) for `PackedLinear` layers: steps of up to `MAX_ROWS` tokens read the
weight oneDNN packed at load, in place, and stream it once (at these sizes oneDNN read it at 3-6.5 GB/s on one
core whose plain reads run at 8 GB/s).

Measured on a 2-vCPU AMX Xeon, the bundled 135M model's 120 decoder projections per step: 1.2-1.7x faster than
oneDNN's packed matmul at 1, 8 and 32 rows, 1 or 2 threads. The outputs are oneDNN's, bit for bit: the kernel
accumulates the same tiles in the same order and rounds once, as oneDNN's AMX brgemm does for these row counts
(above 32 rows oneDNN blocks the inputs differently, and keeps those steps). The engine checks that on the
model's own shapes at start (`differs_from_onednn`) before trusting it with its tokens: the check would also
catch a oneDNN build that packs in another layout. `resolve_cpu_matmul` picks it for an engine
(`LLM_CPU_MATMUL`), as `paged_attention_cpu` does for attention; `c_build` builds it.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from common import c_build

SOURCE = Path(__file__).with_name("matmul_cpu.c")
FLAGS = (*c_build.FLAGS, "-fopenmp")
MAX_ROWS = 32  # as in the C source
BLOCK = 32  # features per weight tile: both feature counts must be multiples of it

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


class MatmulKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._linear = lib.packed_linear
        self._linear.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, _int]
        self._linear.restype = ctypes.c_int

    @staticmethod
    def supports(in_features: int, out_features: int) -> bool:
        return in_features % BLOCK == 0 and out_features % BLOCK == 0

    @staticmethod
    def applies(rows: torch.Tensor) -> bool:
        """Whether a step's input rows `[M, in]` take the kernel: 1 to `MAX_ROWS` of them."""
        return 0 < rows.shape[0] <= MAX_ROWS

    def __call__(self, rows: torch.Tensor, packed_address: int, bias: torch.Tensor | None,
                 out_features: int) -> torch.Tensor:
        """`rows @ weight.T + bias` `[M, out]` for contiguous bf16 rows `[M, in]` and a oneDNN-packed bf16 weight
        of `out` x `in` at `packed_address` (`torch.ops.mkldnn.data_ptr`, which costs microseconds a call: a
        layer looks it up once). `differs_from_onednn` checks a weight once; each call only checks the rows."""
        assert rows.dtype == torch.bfloat16 and rows.is_contiguous()
        out = torch.empty(rows.shape[0], out_features, dtype=torch.bfloat16)
        status = self._linear(rows.data_ptr(), rows.shape[0], rows.shape[1], packed_address, out_features,
                              None if bias is None else bias.data_ptr(), out.data_ptr(), torch.get_num_threads())
        assert status == 0, "shapes the kernel does not take (MatmulKernel.supports and applies say which)"
        return out

    def differs_from_onednn(self, packed_weight: torch.Tensor, bias: torch.Tensor | None, in_features: int,
                            out_features: int) -> bool:
        """Whether the kernel's outputs differ from oneDNN's for this packed weight, on random rows of a few
        counts up to `MAX_ROWS` (both row halves, partial and whole). True as well for a weight or bias the
        kernel cannot read: not bf16, or packed into another number of bytes."""
        readable = (packed_weight.dtype == torch.bfloat16
                    and torch.ops.mkldnn._nbytes(packed_weight) == 2 * in_features * out_features
                    and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())))
        if not readable:
            return True
        generator = torch.Generator().manual_seed(0)
        for count in (1, 7, 16, 23, MAX_ROWS):
            rows = torch.randn(count, in_features, generator=generator).mul_(3).to(torch.bfloat16)
            expected = torch.ops.mkldnn._linear_pointwise(rows, packed_weight, bias, "none", [], "")
            if not torch.equal(self(rows, torch.ops.mkldnn.data_ptr(packed_weight), bias, out_features), expected):
                return True
        return False


def load(compiler: str | None = None, directory: Path | None = None) -> MatmulKernel:
    """Raises `c_build.KernelBuildError` where the CPU has no AMX bf16, the build fails, or Linux does not grant
    the process the AMX tile state."""
    return MatmulKernel(c_build.load_amx_library(SOURCE, FLAGS, compiler, directory))


@functools.cache
def shared_kernel() -> MatmulKernel | None:
    """The kernel for this process, or None (with one warning) where it does not build or run."""
    return c_build.load_or_warn(load, "CPU AMX matmul kernel not available, decode-sized linears stay on oneDNN")


def resolve_cpu_matmul(choice: str) -> MatmulKernel | None:
    """`LLM_CPU_MATMUL`: the kernel decode-sized packed linears run on, or None for oneDNN."""
    return c_build.resolve(choice, load, shared_kernel)
