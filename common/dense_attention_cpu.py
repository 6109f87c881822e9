"""Dense bf16 attention on AMX (`dense_attention_cpu.c`) for transformers encoders on CPU: the embed and rerank
services' models run their attention here instead of torch's CPU flash attention.

Measured on a 2-vCPU AMX Xeon for all-MiniLM-L6-v2 in bf16 (12 heads of 32, 32 rows of 254 tokens): torch's
`scaled_dot_product_attention` ran at about 60 GFLOP/s and took 45% of a batch, next to linear layers at about
600 GFLOP/s. The kernel computes both products on AMX tiles and the softmax in fp32; its outputs are within bf16
rounding of an fp32 computation (tests check both that and the embeddings).

`use_in(model)` switches every transformers model inside a module to the attention implementation this module
registers with transformers (`IMPLEMENTATION`). That implementation takes bidirectional attention whose mask only
hides padding (every query of a row sees the same contiguous keys) in bf16 on CPU; anything else, a causal or
arbitrary mask, dropout, another dtype or head size, goes to transformers' own SDPA path unchanged.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from common import c_build

SOURCE = Path(__file__).with_name("dense_attention_cpu.c")
FLAGS = (*c_build.FLAGS, "-fopenmp")
HEAD_DIM_MULTIPLE, MAX_HEAD_DIM = 32, 256  # as in the C source
IMPLEMENTATION = "cpu_amx_dense"  # the name registered with transformers' attention and mask interfaces

_ptr, _i64, _int, _float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


class DenseAttentionKernel:
    def __init__(self, lib: ctypes.CDLL) -> None:
        self._attention = lib.dense_attention
        self._attention.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64,
                                    _ptr, _ptr, _ptr, _ptr, _ptr, _float, _int, _int]
        self._attention.restype = ctypes.c_int

    @staticmethod
    def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether `[batch, heads, positions, head_dim]` CPU bf16 tensors are ones the kernel reads: head dims
        contiguous, a head size that is a multiple of 32 up to 256, heads a multiple of the key/value heads."""
        tensors = (query, key, value)
        head_dim = query.shape[-1]
        return (all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.dim() == 4 and t.stride(-1) == 1
                    for t in tensors)
                and key.shape == value.shape and key.shape[-1] == head_dim and key.shape[0] == query.shape[0]
                and head_dim % HEAD_DIM_MULTIPLE == 0 and head_dim <= MAX_HEAD_DIM
                and query.shape[1] % key.shape[1] == 0)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                 kv_ranges: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """`softmax(query @ key^T * scale) @ value` as `[batch, q_len, heads, head_dim]` (the layout the output
        projection reads), for query `[batch, heads, q_len, head_dim]` and key/value `[batch, kv_heads, kv_len,
        head_dim]` (`supports`). `kv_ranges` `[batch, 2]` int64: the keys [start, end) each row sees (all where
        None); `causal`: each query also sees no key after its own position, counted from the end."""
        assert self.supports(query, key, value)
        batch, heads, q_len, head_dim = query.shape
        kv_heads, kv_len = key.shape[1], key.shape[2]
        out = torch.empty(batch, q_len, heads, head_dim, dtype=torch.bfloat16)
        strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (query, key, value)]
        out_strides = (ctypes.c_int64 * 3)(out.stride(0), out.stride(2), out.stride(1))
        if kv_ranges is not None:
            assert kv_ranges.dtype == torch.int64 and kv_ranges.shape == (batch, 2) and kv_ranges.is_contiguous()
        status = self._attention(query.data_ptr(), key.data_ptr(), value.data_ptr(), out.data_ptr(), batch, heads,
                                 kv_heads, q_len, kv_len, head_dim, *strides, out_strides,
                                 None if kv_ranges is None else kv_ranges.data_ptr(), scale, int(causal),
                                 torch.get_num_threads())
        assert status == 0, "shapes or key ranges the kernel does not take, or no scratch memory"
        return out


def load(compiler: str | None = None, directory: Path | None = None) -> DenseAttentionKernel:
    """Raises `c_build.KernelBuildError` where the CPU has no AMX bf16, the build fails, or Linux does not grant
    the process the AMX tile state."""
    return DenseAttentionKernel(c_build.load_amx_library(SOURCE, FLAGS, compiler, directory))


@functools.cache
def shared_kernel() -> DenseAttentionKernel | None:
    """The kernel for this process, or None (with one warning) where it does not build or run."""
    return c_build.load_or_warn(load, "CPU AMX attention kernel not available, encoders keep torch's attention")


def resolve_dense_attention(choice: str) -> DenseAttentionKernel | None:
    """A service's `*_CPU_ATTENTION` setting: the kernel its bf16 CPU encoder runs attention on, or None for
    torch's."""
    return c_build.resolve(choice, load, shared_kernel)


def padding_ranges(mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor | None:
    """`[batch, 2]` key ranges [start, end) for an SDPA boolean mask `[batch, 1 or heads, 1 or q_len, kv_len]`
    (True: attend) that only hides padding: every query of a row sees the same contiguous, non-empty run of keys.
    None for any other mask. No mask: every key."""
    if mask is None:
        return torch.tensor([[0, kv_len]] * batch, dtype=torch.int64)
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[0] != batch or mask.shape[-1] != kv_len:
        return None
    rows = mask[:, 0, 0, :]
    if not torch.equal(mask, rows[:, None, None, :].expand(mask.shape)):
        return None
    count = rows.sum(-1)
    first = rows.to(torch.uint8).argmax(-1)
    end = kv_len - rows.flip(-1).to(torch.uint8).argmax(-1)
    if not bool((count > 0).all()) or not torch.equal(count, end - first):
        return None
    return torch.stack([first, end], -1).to(torch.int64).contiguous()


def _attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; returns `[batch, q_len, heads, head_dim]` as SDPA's does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kernel = shared_kernel()
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    ranges = None
    if kernel is not None and not causal and not dropout and kernel.supports(query, key, value):
        ranges = padding_ranges(attention_mask, query.shape[0], key.shape[2])
    if ranges is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return kernel(query, key, value, scale, ranges), None


@functools.cache
def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the masks SDPA takes


def use_in(module: torch.nn.Module) -> int:
    """Switch the transformers models inside `module` that use SDPA to this attention; returns how many."""
    from transformers import PreTrainedModel

    _register()
    switched = 0
    for model in module.modules():
        if isinstance(model, PreTrainedModel) and model.config._attn_implementation == "sdpa":
            model.set_attn_implementation(IMPLEMENTATION)
            switched += 1
    return switched
