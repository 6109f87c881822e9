"""The compiled CPU RMSNorm, rotary and SiLU-and-mul equal their eager references; the engine uses them for prefills.

Compiling takes seconds (about 5 with inductor's on-disk cache warm, 20 cold on a busy 2-core machine), so the
kernels compile once per session and the engine test reuses them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.llm.engine import SamplingParams
from services.llm.engine.runner import pack_step
from services.llm.kernels import activation, cpu_compiled, norm, rotary
from services.llm.layers.activation import SiluAndMul
from services.llm.layers.norm import RMSNorm
from services.llm.layers.rotary import RotaryEmbedding

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, INTERMEDIATE = 4, 2, 16, 64, 128
EPS = 1e-6
COMPILED = RMSNorm | RotaryEmbedding | SiluAndMul  # the layers that take the compiled kernels


@pytest.fixture(scope="module")
def cos_sin_cache() -> torch.Tensor:
    return rotary.build_cos_sin_cache(HEAD_DIM, 1024, 10000.0)


@pytest.fixture(scope="module")
def compiled(cos_sin_cache: torch.Tensor) -> float:
    return cpu_compiled.warm_up(HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, EPS, cos_sin_cache, torch.bfloat16)


@pytest.mark.parametrize("tokens", [cpu_compiled.MIN_ROWS, 300])
def test_compiled_kernels_equal_the_references(compiled: float, cos_sin_cache: torch.Tensor, tokens: int) -> None:
    torch.manual_seed(tokens)
    weight = torch.randn(HIDDEN, dtype=torch.bfloat16)
    x = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16) * 4
    residual = torch.randn(tokens, HIDDEN, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = norm.rms_norm_reference(x, weight, EPS)
        got = cpu_compiled.rms_norm(x, weight, EPS)
        want_normed, want_sum = norm.fused_add_rms_norm_reference(x, residual, weight, EPS)
        got_normed, got_sum = cpu_compiled.fused_add_rms_norm(x, residual, weight, EPS)
        # The mean's fp32 sum may be added in another order: at most one bf16 step apart, and rarely.
        for a, b in ((got, want), (got_normed, want_normed)):
            assert torch.allclose(a.float(), b.float(), rtol=2 ** -7, atol=0)
            assert (a != b).float().mean() < 0.01
        assert torch.equal(got_sum, want_sum)
        gate_up = torch.randn(tokens, 2 * INTERMEDIATE, dtype=torch.bfloat16) * 3
        assert torch.equal(cpu_compiled.silu_and_mul(gate_up), activation.silu_and_mul_reference(gate_up))

        qkv = torch.randn(tokens, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=torch.bfloat16)
        expected = qkv.clone()
        positions = torch.randperm(1024)[:tokens]
        for target, apply in ((qkv, cpu_compiled.apply_rotary), (expected, rotary.apply_rotary_reference)):
            q = target[:, :HEADS * HEAD_DIM].view(tokens, HEADS, HEAD_DIM)
            k = target[:, HEADS * HEAD_DIM:(HEADS + KV_HEADS) * HEAD_DIM].view(tokens, KV_HEADS, HEAD_DIM)
            apply(q, k, positions, cos_sin_cache)
        assert torch.equal(qkv, expected)  # rotary bit for bit; the values (last columns) untouched


def test_bf16_cpu_engine_compiles_its_elementwise_kernels_for_prefills(compiled: float, tiny_models: dict[str, Path],
                                                                   make_engine) -> None:
    engine = make_engine(tiny_models["llama"], dtype="bfloat16")
    modules = [m for m in engine.runner.model.modules() if isinstance(m, COMPILED)]
    assert len(modules) == 2 * 3 + 1 + 1  # two norms and the MLP's activation per layer, the final norm, rotary
    assert all(m.compiled_cpu for m in modules)
    assert not any(m.compiled_cpu for m in make_engine(tiny_models["llama"], dtype="bfloat16", cpu_compile=False)
                   .runner.model.modules() if isinstance(m, COMPILED))
    assert not any(m.compiled_cpu for m in make_engine(tiny_models["llama"]).runner.model.modules()
                   if isinstance(m, COMPILED))  # fp32 stays eager, exact against transformers

    # A prefill past MIN_ROWS through the compiled kernels gives the eager model's logits, near enough.
    prompt = torch.randint(4, 384, (200,)).tolist()
    runner = engine.runner
    step = pack_step([prompt], [0], [list(range(len(prompt) // 16 + 1))], runner.block_size,
                     runner.kv_bytes_per_token, runner.device)

    def logits() -> torch.Tensor:
        with torch.inference_mode():
            return runner.model.compute_logits(runner.model(step.input_ids, step.positions, step.meta)).float()

    compiled_logits = logits()
    for module in modules:
        module.compiled_cpu = False
    eager_logits = logits()
    assert (compiled_logits.argmax(-1) == eager_logits.argmax(-1)).float().mean() > 0.95
    assert (compiled_logits - eager_logits).abs().max() < 0.1 * eager_logits.abs().max()


def test_engine_serves_eagerly_where_compiling_fails(tiny_models: dict[str, Path], make_engine,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(*args: object) -> float:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(cpu_compiled, "warm_up", no_compiler)
    engine = make_engine(tiny_models["llama"], dtype="bfloat16")
    assert not any(m.compiled_cpu for m in engine.runner.model.modules() if isinstance(m, COMPILED))
    output = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)[0]
    assert len(output.outputs[0].token_ids) == 3

