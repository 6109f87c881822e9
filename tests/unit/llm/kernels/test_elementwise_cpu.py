"""The C elementwise kernels bit for bit against the eager torch references, and engines with them on and off."""

from __future__ import annotations

import pytest
import torch

from services.llm.kernels import elementwise_cpu
from services.llm.kernels.activation import silu_and_mul_reference
from services.llm.kernels.elementwise_cpu import ElementwiseKernel
from services.llm.kernels.norm import fused_add_rms_norm_reference, rms_norm_reference
from services.llm.kernels.rotary import apply_rotary_reference, build_cos_sin_cache

DTYPES = [torch.float32, torch.bfloat16]
ROWS = [1, 7, 32]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> ElementwiseKernel:
    return elementwise_cpu.load(directory=tmp_path_factory.mktemp("kernels"))


def random(rows: int, width: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("hidden", [576, 64, 4096, 100, 17])
def test_rms_norm_is_the_reference_bit_for_bit(kernel: ElementwiseKernel, dtype: torch.dtype, rows: int,
                                               hidden: int) -> None:
    wide = random(rows, hidden + 5, dtype, seed=rows * hidden, scale=3.0)
    x = wide[:, 2:hidden + 2]  # strided rows, as a view of a wider buffer
    residual = random(rows, hidden, dtype, seed=1 + rows, scale=5.0)
    weight = random(1, hidden, dtype, seed=2)[0]
    assert torch.equal(kernel.rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5))
    got_out, got_sum = kernel.fused_add_rms_norm(x, residual, weight, 1e-6)
    want_out, want_sum = fused_add_rms_norm_reference(x, residual, weight, 1e-6)
    assert torch.equal(got_sum, want_sum) and torch.equal(got_out, want_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [(9, 3, 64), (4, 4, 128), (2, 1, 6)])
def test_rotary_is_the_reference_bit_for_bit(kernel: ElementwiseKernel, dtype: torch.dtype, rows: int,
                                             num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    table = build_cos_sin_cache(head_dim, 4097, 10000.0)
    positions = torch.randint(0, 4097, (rows,), generator=torch.Generator().manual_seed(rows))
    qkv = random(rows, (num_heads + 2 * num_kv_heads) * head_dim, dtype, seed=head_dim + rows, scale=2.0)
    want = qkv.clone()
    for fused, apply in ((qkv, kernel.apply_rotary), (want, apply_rotary_reference)):
        q = fused[:, :num_heads * head_dim].view(rows, num_heads, head_dim)
        k = fused[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim].view(rows, num_kv_heads, head_dim)
        apply(q, k, positions, table)
    assert torch.equal(qkv, want)  # q and k rotated alike, v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("width", [1536, 64, 100, 7])
def test_silu_and_mul_is_the_reference_bit_for_bit(kernel: ElementwiseKernel, dtype: torch.dtype, rows: int,
                                                   width: int) -> None:
    gate_up = random(rows, 2 * width, dtype, seed=width + rows, scale=6.0)  # past SLEEF exp's range ends too
    assert torch.equal(kernel.silu_and_mul(gate_up), silu_and_mul_reference(gate_up))
