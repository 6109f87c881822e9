"""GPTQ rounding (`LLM_QUANTIZATION=fp8` rounds so at load, on `services/llm/calibration.txt`): on inputs with the
correlations real activations have, it gives a smaller layer-output error than rounding each weight to nearest, on
the same grid and scales the kernels read; and the loader's fp8 weights are exactly that rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.llm import calibration
from services.llm.calibration import calibration_chunks, projection_hessian_groups, projection_hessians
from services.llm.kernels.fp8_matmul import FP8_WEIGHT_DTYPE, quantize_fp8_per_channel
from services.llm.kernels.int8_matmul import quantize_int8_per_channel
from services.llm.layers.fp8_linear import Fp8Linear
from services.llm.loader import load_model

CPU = torch.device("cpu")


def activations(tokens: int, mixing: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Features driven by a few shared factors (`mixing` [factors, features]) plus noise, a few channels much larger
    than the rest (as after RMSNorm)."""
    gains = torch.ones(mixing.shape[1])
    gains[:4] = 20.0
    factors = torch.randn(tokens, mixing.shape[0], generator=generator)
    return (factors @ mixing + 0.1 * torch.randn(tokens, mixing.shape[1], generator=generator)) * gains


@pytest.mark.parametrize("quantize", [quantize_fp8_per_channel, quantize_int8_per_channel])
def test_gptq_rounding_lowers_the_layer_output_error_on_the_same_grid(quantize) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=generator) * 0.05
    mixing = torch.randn(8, 256, generator=generator)
    calibration, held_out = activations(2048, mixing, generator), activations(512, mixing, generator)
    nearest, nearest_scale = quantize(weight)
    gptq, gptq_scale = quantize(weight, calibration.T @ calibration)
    assert gptq.dtype == nearest.dtype and torch.equal(gptq_scale, nearest_scale)  # the kernels' contract
    assert torch.isfinite(gptq.float()).all() and gptq.float().abs().max() <= gptq.float().new_tensor(
        448.0 if gptq.dtype == FP8_WEIGHT_DTYPE else 127.0)

    def output_error(q: torch.Tensor, scale: torch.Tensor) -> float:
        return float((held_out @ (q.float() * scale[:, None] - weight).T).norm())

    assert output_error(gptq, gptq_scale) < 0.5 * output_error(nearest, nearest_scale)


# The whole model's Hessians in one pass (the default budget), or one projection's per pass: the same rounding,
# since every pass runs the unquantized model.
@pytest.mark.parametrize("budget_bytes", [None, 1])
def test_fp8_load_rounds_by_gptq_on_the_calibration_text(tiny_models: dict[str, Path], budget_bytes: int | None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    plain = load_model(str(tiny_models["llama"]), CPU, torch.float32)
    hessians = projection_hessians(plain, calibration_chunks(plain.tokenizer), CPU, torch.float32)
    names = {module: name for name, module in plain.model.named_modules()}
    if budget_bytes is not None:
        monkeypatch.setattr(calibration, "HESSIAN_BUDGET_BYTES", budget_bytes)
    fp8 = load_model(str(tiny_models["llama"]), CPU, torch.float32, "fp8")
    nearest_differs = False
    for linear, hessian in hessians.items():
        layer = fp8.model.get_submodule(names[linear])
        assert isinstance(layer, Fp8Linear)
        w8, scale = quantize_fp8_per_channel(linear.weight, hessian)
        assert torch.equal(layer.qweight.view(torch.uint8), w8.view(torch.uint8)) and torch.equal(layer.scale, scale)
        nearest_differs |= not torch.equal(quantize_fp8_per_channel(linear.weight)[0].view(torch.uint8),
                                           w8.view(torch.uint8))
    assert len(hessians) == 2 * 4 and nearest_differs  # 2 layers of qkv, o, gate_up, down


def test_hessians_come_in_groups_that_fit_the_budget_and_equal_one_pass(tiny_models: dict[str, Path]) -> None:
    plain = load_model(str(tiny_models["llama"]), CPU, torch.float32)
    chunks = calibration_chunks(plain.tokenizer)
    whole = projection_hessians(plain, chunks, CPU, torch.float32)
    largest = max(h.numel() * 4 for h in whole.values())
    for budget, passes in ((1, range(len(whole), len(whole) + 1)), (2 * largest, range(2, len(whole))),
                           (None, range(1, 2))):
        groups = list(projection_hessian_groups(plain, chunks, CPU, torch.float32, budget))
        assert len(groups) in passes
        for group in groups:  # over the budget only where one Hessian alone is
            assert len(group) == 1 or sum(h.numel() * 4 for h in group.values()) <= (budget or 1 << 30)
        merged = {linear: h for group in groups for linear, h in group.items()}
        assert list(merged) == list(whole)  # model order, each projection once
        assert all(torch.equal(merged[linear], whole[linear]) for linear in whole)
