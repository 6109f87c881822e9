"""The decode matmul (`matmul_cpu.c`) for `PackedLinear` layers: steps of up to `MAX_ROWS` tokens read the
weight oneDNN packed at load, in place, and stream it once. It is built for AMX cores (oneDNN's AMX layout) or,
on cores with AVX512-BF16 but no AMX, for that layout (`layout`).

Measured, the bundled 135M model's 120 decoder projections and LM head per step:
- on a 2-vCPU AMX Xeon, 1.2-1.7x faster than oneDNN's packed matmul at 1, 8 and 32 rows, 1 or 2 threads (there
  oneDNN read the weights at 3-6.5 GB/s on one core whose plain reads run at 8 GB/s);
- on a 2-vCPU AMD EPYC (AVX512-BF16), 1.2-1.5x faster at 1 to 32 rows, 1 or 2 threads: at one row 7.6 against
  10.2 ms a step on one thread, 4.2-5.0 against 6.6-7.0 ms on two.
The outputs are oneDNN's, bit for bit: the kernel accumulates in oneDNN's order and rounds once, as oneDNN's brgemm
does for these row counts. The engine checks that on the model's own shapes at start (`differs_from_onednn`)
before trusting it with its tokens: the check would also catch a oneDNN build that packs in another layout or
sums in another order. `resolve_cpu_matmul` picks it for an engine (`LLM_CPU_MATMUL`), as `paged_attention_cpu`
does for attention; `c_build` builds it.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from common import c_build
from common.cpu import cpu_flags

SOURCE = Path(__file__).with_name("matmul_cpu.c")
FLAGS = (*c_build.FLAGS, "-fopenmp")
MAX_ROWS = 32  # as in the C source
BLOCK = 32  # input features per weight block (and output features per AMX block): the counts must be multiples
WIDE_BLOCK = 64  # output features per AVX512-BF16 block: oneDNN pads the last one with zeros
LAYOUTS = {1: "amx", 2: "avx512_bf16"}  # as `packed_linear_layout` numbers them

_i64, _ptr, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


class MatmulKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._linear = lib.packed_linear
        self._linear.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, _int]
        self._linear.restype = ctypes.c_int
        lib.packed_linear_layout.restype = ctypes.c_int
        self.layout = LAYOUTS.get(lib.packed_linear_layout())  # None: a build without either kernel

    def supports(self, in_features: int, out_features: int) -> bool:
        return in_features % BLOCK == 0 and (self.layout == "avx512_bf16" or out_features % BLOCK == 0)

    def packed_bytes(self, in_features: int, out_features: int) -> int:
        """The size of the buffer oneDNN packs such a weight into, in the layout this kernel reads."""
        if self.layout == "avx512_bf16":
            out_features = -(-out_features // WIDE_BLOCK) * WIDE_BLOCK
        return 2 * in_features * out_features

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
                    and torch.ops.mkldnn._nbytes(packed_weight) == self.packed_bytes(in_features, out_features)
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
    """Raises `c_build.KernelBuildError` where the CPU has neither AMX bf16 nor AVX512-BF16, the build fails, or
    (AMX) Linux does not grant the process the AMX tile state."""
    flags = cpu_flags()
    if not c_build.AMX_FLAGS - flags:
        return MatmulKernel(c_build.load_amx_library(SOURCE, FLAGS, compiler, directory))
    if "avx512_bf16" not in flags:
        raise c_build.KernelBuildError("the CPU has neither AMX bf16 nor AVX512-BF16")
    kernel = MatmulKernel(ctypes.CDLL(str(c_build.build(SOURCE, FLAGS, compiler, directory))))
    if kernel.layout != "avx512_bf16":
        raise c_build.KernelBuildError("the compiler built no AVX512-BF16 code here")
    return kernel


@functools.cache
def shared_kernel() -> MatmulKernel | None:
    """The kernel for this process, or None (with one warning) where it does not build or run."""
    return c_build.load_or_warn(load, "CPU matmul kernel not available, decode-sized linears stay on oneDNN")


def resolve_cpu_matmul(choice: str) -> MatmulKernel | None:
    """`LLM_CPU_MATMUL`: the kernel decode-sized packed linears run on, or None for oneDNN."""
    return c_build.resolve(choice, load, shared_kernel)
