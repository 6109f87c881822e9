"""Weight-only quantized GEMMs: the Triton kernels (interpreted on the CPU) against their torch references, and
the GGUF block layout against the `gguf` package's own dequantization."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from services.llm.kernels.gguf_matmul import FORMATS, dequantize, gguf_matmul_reference, in_features, unpack_rows
from services.llm.kernels.int8_matmul import int8_matmul_reference, quantize_int8_per_channel
from services.llm.kernels.quantized_matmul_triton import gguf_matmul_triton, int8_matmul_triton, tiles
from tests.unit.llm.gguf_files import random_k_quant_rows
from tests.unit.llm.kernels.triton_mode import requires_interpreter

# The interpreter multiplies bf16 `tl.dot` operands as raw 16-bit patterns, so bf16 is left to tests/gpu.
DTYPES = [torch.float32, torch.float16]
# Row counts that pick each of the three tilings; 96 output features are not a multiple of 64 or 128, and
# 160 input features (5 GGUF blocks) are not a multiple of the 64- or 128-wide K tiles: every mask is exercised.
ROWS = [1, 5, 40, 130]
OUT_FEATURES, IN_FEATURES = 96, 160


# Q4_K's and Q6_K's super-blocks hold 256 weights: 768 input features are three of them.
K_QUANT_IN_FEATURES = 768


def gguf_rows(fmt: str, seed: int) -> np.ndarray:
    """GGUF rows of `fmt`: quantized by the `gguf` package, or random blocks for the K-quants (which it cannot
    quantize)."""
    rng = np.random.default_rng(seed)
    if fmt in ("Q4_K", "Q6_K"):
        return random_k_quant_rows(fmt, OUT_FEATURES, K_QUANT_IN_FEATURES, rng)
    weights = rng.standard_normal((OUT_FEATURES, IN_FEATURES)).astype(np.float32)
    return gguf.quants.quantize(weights, gguf.GGMLQuantizationType[fmt])


def gguf_blocks(fmt: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return unpack_rows(fmt, gguf_rows(fmt, seed))


def tolerance(dtype: torch.dtype, expected: torch.Tensor) -> dict[str, float]:
    scale = expected.abs().max().item()
    return {"rtol": 1e-5, "atol": 1e-5 * scale} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3 * scale}


def test_tilings_differ_by_row_count() -> None:
    assert len({tuple(tiles(rows).items()) for rows in ROWS}) == 3


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_block_layout_dequantizes_as_the_gguf_package_does(fmt: str) -> None:
    raw = gguf_rows(fmt, seed=7)
    q, scale, minimum = unpack_rows(fmt, raw)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[fmt])
    assert np.array_equal(dequantize(FORMATS[fmt], q, scale, minimum).numpy(), want)
    assert q.dtype == (torch.int8 if fmt in ("Q8_0", "Q6_K") else torch.uint8)
    assert scale.dtype == (torch.float32 if fmt in ("Q4_K", "Q6_K") else torch.float16)
    assert q.shape[1] // scale.shape[1] == {"Q6_K": 16, "Q8_0": 32}.get(fmt, 16)  # bytes per scale
    assert (minimum is not None) == (fmt in ("Q4_1", "Q4_K"))


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
def test_int8_kernel_matches_reference(dtype: torch.dtype, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    q, scale = quantize_int8_per_channel(torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator))
    x = torch.randn(rows, IN_FEATURES, generator=generator).to(dtype)
    expected = x.double() @ (q.double() * scale.double()[:, None]).T
    got = int8_matmul_triton(x, q, scale.to(dtype))
    assert got.dtype == dtype and got.shape == (rows, OUT_FEATURES)
    torch.testing.assert_close(got.double(), expected, **tolerance(dtype, expected))
    reference = int8_matmul_reference(x, q, scale.to(dtype))
    torch.testing.assert_close(reference.double(), expected, **tolerance(dtype, expected))


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gguf_kernel_matches_reference(fmt: str, dtype: torch.dtype, rows: int) -> None:
    q, scale, minimum = gguf_blocks(fmt, seed=rows)
    x = torch.randn(rows, in_features(q), generator=torch.Generator().manual_seed(rows)).to(dtype)
    weights = dequantize(FORMATS[fmt], q, scale, minimum).to(dtype)
    expected = x.double() @ weights.double().T
    got = gguf_matmul_triton(x, FORMATS[fmt], q, scale, minimum)
    assert got.dtype == dtype and got.shape == (rows, OUT_FEATURES)
    torch.testing.assert_close(got.double(), expected, **tolerance(dtype, expected))
    reference = gguf_matmul_reference(x, FORMATS[fmt], q, scale, minimum)
    torch.testing.assert_close(reference.double(), expected, **tolerance(dtype, expected))


@requires_interpreter
def test_gguf_kernel_reads_strided_rows() -> None:
    q, scale, minimum = gguf_blocks("Q4_1", seed=3)
    wide = torch.randn(3, 2 * IN_FEATURES)
    x = wide[:, :IN_FEATURES]  # a view with a row stride twice its width, as a split of a fused output
    got = gguf_matmul_triton(x, FORMATS["Q4_1"], q, scale, minimum)
    torch.testing.assert_close(got, gguf_matmul_reference(x.contiguous(), FORMATS["Q4_1"], q, scale, minimum),
                               rtol=1e-5, atol=1e-4)
