"""The C elementwise kernels (`elementwise_cpu.c`) for decode-sized CPU steps: RMSNorm with its residual add,
rotary and SiLU-and-mul, each one call instead of 3 to 15 eager torch ops (and their dispatch).

Bit for bit the eager references in `norm.py`, `rotary.py` and `activation.py` (the tests compare them with
`torch.equal`): the C code rounds where torch rounds, sums in torch's order and splits SiLU's rows where torch's
loops do, which depends on the width of torch's CPU vectors, so the kernel is offered only where torch runs AVX2
or AVX512 code. Steps of `cpu_compiled.MIN_ROWS` tokens and more take the compiled kernels instead.
`resolve_cpu_elementwise` picks it for an engine (`LLM_CPU_ELEMENTWISE`), as `paged_attention_cpu` does for
attention; `c_build` builds it.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from common import c_build

SOURCE = Path(__file__).with_name("elementwise_cpu.c")
# Without contraction: torch rounds each product before the add that follows it. Without trapping math the
# SiLU loop's selects vectorize (results unchanged).
FLAGS = (*c_build.FLAGS, "-ffp-contract=off", "-fno-trapping-math")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
MAX_HIDDEN, MAX_HEAD_DIM = 16384, 1024  # as in the C source
# Floats per torch CPU vector, by `torch.backends.cpu.get_cpu_capability()`: the width of its elementwise loops.
FLOAT_LANES = {"AVX512": 16, "AVX2": 8}
# torch's float sum adds in lanes of 8 under AVX2 and AVX512 alike (measured with torch 2.13; the tests hold it).
SUM_LANES = 8

_i64, _ptr, _int, _float = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int, ctypes.c_float


class ElementwiseKernel:
    def __init__(self, library: Path, float_lanes: int) -> None:
        lib = ctypes.CDLL(str(library))
        self._rms_norm, self._rotary, self._silu_and_mul = lib.rms_norm, lib.rotary, lib.silu_and_mul
        self._rms_norm.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _float, _int, _int]
        self._rotary.argtypes = [_ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _int]
        self._silu_and_mul.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _int, _i64]
        for function in (self._rms_norm, self._rotary, self._silu_and_mul):
            function.restype = ctypes.c_int
        self.float_lanes = float_lanes

    @staticmethod
    def supports(dtype: torch.dtype, hidden_size: int, head_dim: int) -> bool:
        # under SUM_LANES elements a row, torch sums in another order
        return (dtype in DTYPE_CODES and 2 * SUM_LANES <= hidden_size <= MAX_HIDDEN and head_dim <= MAX_HEAD_DIM
                and head_dim % 2 == 0)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """`norm.rms_norm_reference` of x `[T, H]` (rows may be strided)."""
        out = torch.empty(x.shape, dtype=x.dtype)
        self._norm(x, None, None, weight, out, eps)
        return out

    def fused_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`norm.fused_add_rms_norm_reference`: `(rms_norm(x + residual), x + residual)`."""
        out, summed = torch.empty(x.shape, dtype=x.dtype), torch.empty(x.shape, dtype=x.dtype)
        self._norm(x, residual, summed, weight, out, eps)
        return out, summed

    def _norm(self, x: torch.Tensor, residual: torch.Tensor | None, summed: torch.Tensor | None,
              weight: torch.Tensor, out: torch.Tensor, eps: float) -> None:
        assert x.dim() == 2 and x.stride(1) == 1 and weight.is_contiguous() and weight.dtype == x.dtype
        assert residual is None or (residual.dtype == x.dtype and residual.stride(1) == 1)
        status = self._rms_norm(x.data_ptr(), x.stride(0), None if residual is None else residual.data_ptr(),
                                0 if residual is None else residual.stride(0),
                                None if summed is None else summed.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                x.shape[0], x.shape[1], eps, DTYPE_CODES[x.dtype], SUM_LANES)
        assert status == 0, "a hidden size the kernel does not take (ElementwiseKernel.supports says which)"

    def apply_rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
        """`rotary.apply_rotary_reference`: in place on q `[T, Hq, D]` and k `[T, Hkv, D]` (rows may be strided,
        heads not), from the fp32 `[P, D]` table and int64 positions."""
        head_dim = q.shape[2]
        assert q.stride(2) == 1 and q.stride(1) == head_dim and k.stride(2) == 1 and k.stride(1) == head_dim
        assert k.dtype == q.dtype and cos_sin_cache.dtype == torch.float32 and cos_sin_cache.is_contiguous()
        assert positions.dtype == torch.int64 and positions.is_contiguous()
        status = self._rotary(q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1],
                              positions.data_ptr(), cos_sin_cache.data_ptr(), q.shape[0], head_dim,
                              DTYPE_CODES[q.dtype])
        assert status == 0, "a head size the kernel does not take (ElementwiseKernel.supports says which)"

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`activation.silu_and_mul_reference` of `[T, 2 * I]` (rows may be strided)."""
        assert gate_up.dim() == 2 and gate_up.stride(1) == 1
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, width, dtype=gate_up.dtype)
        # torch's loop runs two vectors at a time, and the elements past the last pair in scalar code
        vector_block = 2 * self.float_lanes * (2 if gate_up.dtype == torch.bfloat16 else 1)
        self._silu_and_mul(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), rows, width,
                           DTYPE_CODES[gate_up.dtype], vector_block)
        return out


    def differs_from_references(self, dtype: torch.dtype, hidden_size: int, intermediate_size: int,
                                num_heads: int, num_kv_heads: int, head_dim: int,
                                cos_sin_cache: torch.Tensor) -> str | None:
        """Which op, if any, is not bit for bit its eager reference on random inputs of a model's shapes: the
        summing order and loop splits the kernel copies were measured on one torch build and CPU, so an engine
        checks them once at start on its own before trusting the kernel with its tokens."""
        from services.llm.kernels import activation, norm, rotary

        generator = torch.Generator().manual_seed(0)

        def probe(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).mul_(3).to(dtype)

        rows = 5
        x, residual, weight = probe(rows, hidden_size), probe(rows, hidden_size), probe(hidden_size)
        if not torch.equal(self.rms_norm(x, weight, 1e-5), norm.rms_norm_reference(x, weight, 1e-5)):
            return "rms_norm"
        if not all(torch.equal(a, b) for a, b in zip(self.fused_add_rms_norm(x, residual, weight, 1e-5),
                                                      norm.fused_add_rms_norm_reference(x, residual, weight, 1e-5),
                                                      strict=True)):
            return "fused_add_rms_norm"
        gate_up = probe(rows, 2 * intermediate_size)
        if not torch.equal(self.silu_and_mul(gate_up), activation.silu_and_mul_reference(gate_up)):
            return "silu_and_mul"
        q, k = probe(rows, num_heads, head_dim), probe(rows, num_kv_heads, head_dim)
        positions = torch.randint(0, cos_sin_cache.shape[0], (rows,), generator=generator)
        q_ref, k_ref = q.clone(), k.clone()
        rotary.apply_rotary_reference(q_ref, k_ref, positions, cos_sin_cache)
        self.apply_rotary(q, k, positions, cos_sin_cache)
        if not (torch.equal(q, q_ref) and torch.equal(k, k_ref)):
            return "rotary"
        return None


def load(compiler: str | None = None, directory: Path | None = None) -> ElementwiseKernel:
    """Raises `c_build.KernelBuildError` where it does not build, or where torch's CPU code is neither AVX2
    nor AVX512 (its vector width sets the order the kernel must sum in)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in FLOAT_LANES:
        raise c_build.KernelBuildError(f"torch runs {capability} CPU code; the kernel matches AVX2 or AVX512")
    return ElementwiseKernel(c_build.build(SOURCE, FLAGS, compiler, directory), FLOAT_LANES[capability])


@functools.cache
def shared_kernel() -> ElementwiseKernel | None:
    """The kernel for this process, or None (with one warning) where it does not build."""
    return c_build.load_or_warn(load, "CPU elementwise kernel not built, decode-sized steps stay on the eager "
                                      "references")


def resolve_cpu_elementwise(choice: str) -> ElementwiseKernel | None:
    """`LLM_CPU_ELEMENTWISE`: the kernel decode-sized steps' norms, rotary and activation run on, or None."""
    return c_build.resolve(choice, load, shared_kernel)
