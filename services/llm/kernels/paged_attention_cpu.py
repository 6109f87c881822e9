"""The C attention kernels (`paged_attention_cpu.c`): built at first use, loaded with ctypes, called per layer.

The decode kernel walks each decode's block table in place, so a step's keys and values are read once instead of
gathered into a padded buffer and read again (the torch path in `attention_cpu`). The prefill kernel (bf16 only,
where the compiler has AVX512-BF16) runs a step's prompts and prompt chunks causally over their paged history in
tiles: scores and p·v as small GEMMs on `_mm512_dpbf16_ps`, the softmax in fp32 between them. On one EPYC core it
takes about a sixth of SDPA's time for a 218-token chunk after a 16-token cached prefix (SmolLM2's 9/3 heads of
64: 0.26 ms a layer against 1.65 ms, SDPA needing an explicit mask, since its CPU kernel has no causal offset for a
cached prefix) and a quarter for a 2,048-token prompt (17 against 69 ms with `is_causal`). `c_build` compiles it
(`-O3 -march=native -fopenmp`) into the per-user kernel cache. Its OpenMP threads are torch's: the library's
libgomp is the one torch has already loaded (same soname), so the kernel shares torch's thread pool instead of
starting a second one, and it uses as many threads as torch does (`torch.get_num_threads()`).
`resolve_cpu_attention` picks the path for an engine (`LLM_CPU_ATTENTION`): `kernel` requires the build,
`auto` falls back to the torch path with one warning when it fails, `torch` never builds.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from common import c_build
from services.llm.kernels.kv_store import FP8_KV_DTYPE

SOURCE = Path(__file__).with_name("paged_attention_cpu.c")
FLAGS = (*c_build.FLAGS, "-fopenmp")
CHOICES = c_build.CHOICES
# The kernel's element codes; queries and outputs are fp32 or bf16, the cache may also be fp8 e4m3.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, FP8_KV_DTYPE: 2}
MODEL_DTYPES = (torch.float32, torch.bfloat16)
MAX_GROUP, MAX_HEAD_DIM = 16, 256  # as in the C source

_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,  # q, out, io dtype
             ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,  # caches, cache dtype, block size
             ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,  # tables, lens, query rows
             ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int]  # .., threads


_PREFILL_ARGTYPES = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,  # q, out
                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64,  # caches, tables
                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,  # starts, q lens, lens, n
                     ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int]  # heads, .., threads


@dataclass(slots=True)
class KernelPrefills:
    """A step's prefills (whole prompts and chunks) as the prefill kernel reads them, made once per step."""
    q_starts: torch.Tensor  # [N] int64: each prefill's first query row among the step's tokens
    q_lens: torch.Tensor  # [N] int32: its new tokens (the last of its tokens)
    seq_lens: torch.Tensor  # [N] int32: all its tokens, cached ones included
    block_tables: torch.Tensor  # [N, W] int32, contiguous


class PrefillKernel:
    """Causal attention of prefills over the paged cache, bf16 queries and cache (see the module docstring)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._function = library.paged_prefill_attention
        self._function.argtypes = _PREFILL_ARGTYPES
        self._function.restype = ctypes.c_int

    @staticmethod
    def supports(model_dtype: torch.dtype, cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> bool:
        return (model_dtype == cache_dtype == torch.bfloat16 and num_heads % num_kv_heads == 0
                and num_heads // num_kv_heads <= MAX_GROUP and head_dim % 16 == 0 and head_dim <= MAX_HEAD_DIM)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, prefills: KernelPrefills,
                 scale: float, out: torch.Tensor) -> None:
        """Writes the prefills' rows of `out` `[T, Hq, D]` from q `[T, Hq, D]`; their keys and values are already
        in the cache."""
        num_heads, head_dim = q.shape[1], q.shape[2]
        assert q.stride(2) == 1 and q.stride(1) == head_dim and out.stride(2) == 1 and out.stride(1) == head_dim
        assert q.dtype == out.dtype == k_cache.dtype == v_cache.dtype == torch.bfloat16 and k_cache.is_contiguous()
        status = self._function(q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0), k_cache.data_ptr(),
                                v_cache.data_ptr(), k_cache.shape[1], prefills.block_tables.data_ptr(),
                                prefills.block_tables.stride(0), prefills.q_starts.data_ptr(),
                                prefills.q_lens.data_ptr(), prefills.seq_lens.data_ptr(), prefills.q_lens.shape[0],
                                num_heads, k_cache.shape[2], head_dim, scale, torch.get_num_threads())
        if status == -2:
            raise MemoryError("the CPU prefill attention kernel could not allocate its packed keys and values or "
                              "its score buffers")
        assert status == 0, "shapes the kernel does not take (PrefillKernel.supports says which)"


@dataclass(slots=True)
class KernelDecodes:
    """A step's decodes as the kernel reads them, made once per step (`attention_cpu.plan_cpu_attention`)."""
    rows: torch.Tensor  # [N] int64: each decode's query row among the step's tokens
    block_tables: torch.Tensor  # [N, W] int32, contiguous
    seq_lens: torch.Tensor  # [N] int32, each >= 1


class DecodeKernel:
    def __init__(self, library: Path) -> None:
        loaded = ctypes.CDLL(str(library))
        self._function = loaded.paged_decode_attention
        self._function.argtypes = _ARGTYPES
        self._function.restype = ctypes.c_int
        # The same library's prefill kernel, where it was built (AVX512-BF16); None elsewhere.
        self.prefill = PrefillKernel(loaded) if loaded.paged_prefill_available() else None

    @staticmethod
    def supports(model_dtype: torch.dtype, cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int,
                 head_dim: int) -> bool:
        return (model_dtype in MODEL_DTYPES and cache_dtype in DTYPE_CODES and num_heads % num_kv_heads == 0
                and num_heads // num_kv_heads <= MAX_GROUP and head_dim <= MAX_HEAD_DIM)

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, decodes: KernelDecodes,
                 scale: float, out: torch.Tensor) -> None:
        """Writes the decodes' rows of `out` `[T, Hq, D]` from q `[T, Hq, D]` (rows may be strided, heads not)."""
        num_heads, head_dim = q.shape[1], q.shape[2]
        assert q.stride(2) == 1 and q.stride(1) == head_dim and out.stride(2) == 1 and out.stride(1) == head_dim
        assert out.dtype == q.dtype and k_cache.is_contiguous() and v_cache.dtype == k_cache.dtype
        status = self._function(q.data_ptr(), q.stride(0), out.data_ptr(), out.stride(0), DTYPE_CODES[q.dtype],
                                k_cache.data_ptr(), v_cache.data_ptr(), DTYPE_CODES[k_cache.dtype], k_cache.shape[1],
                                decodes.block_tables.data_ptr(), decodes.block_tables.stride(0),
                                decodes.seq_lens.data_ptr(), decodes.rows.data_ptr(), decodes.rows.shape[0],
                                num_heads, k_cache.shape[2], head_dim, scale,
                                torch.get_num_threads())
        assert status == 0, "shapes the kernel does not take (DecodeKernel.supports says which)"


def load(compiler: str | None = None, directory: Path | None = None) -> DecodeKernel:
    return DecodeKernel(c_build.build(SOURCE, FLAGS, compiler, directory))


@functools.cache
def shared_kernel() -> DecodeKernel | None:
    """The kernel for this process, or None (with one warning) where it does not build."""
    return c_build.load_or_warn(load, "CPU paged-attention kernel not built, decode attention stays on the "
                                      "torch path")


def resolve_cpu_attention(choice: str) -> DecodeKernel | None:
    """`LLM_CPU_ATTENTION`: the kernel decodes run on, or None for the torch path."""
    return c_build.resolve(choice, load, shared_kernel)
