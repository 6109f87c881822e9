"""The decode matmul (AMX, or AVX512-BF16 without AMX) bit for bit against oneDNN on the same packed weights, its
start-up check, its fallbacks, and engines with it on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common import c_build
from common.cpu import cpu_flags
from services.llm.kernels import matmul_cpu
from services.llm.kernels.matmul_cpu import MatmulKernel
from services.llm.layers.packed_linear import PackedLinear
from tests.unit.llm.test_engine_greedy import greedy, random_prompts, run_staggered

AMX = not c_build.AMX_FLAGS - cpu_flags()
pytestmark = pytest.mark.skipif(not AMX and "avx512_bf16" not in cpu_flags(),
                                reason="this CPU has neither AMX bf16 nor AVX512-BF16")

# (out, in): the bundled 135M model's four projections and LM head, wide-input projections (over 1,024 inputs
# oneDNN sums them in other blocks), the tiny test models', and output counts AVX512-BF16's layout pads.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (1152, 896), (1024, 2048), (128, 64),
          (32, 32), (80, 1088), (200, 96)]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> MatmulKernel:
    return matmul_cpu.load(directory=tmp_path_factory.mktemp("kernels"))


def packed(out_features: int, in_features: int, seed: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).to(torch.bfloat16)
    bias_tensor = torch.randn(out_features, generator=generator).to(torch.bfloat16) if bias else None
    return torch.ops.mkldnn._reorder_linear_weight(weight, 512), bias_tensor


def address(packed_weight: torch.Tensor) -> int:
    return torch.ops.mkldnn.data_ptr(packed_weight)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_every_row_count_is_onednn_bit_for_bit(kernel: MatmulKernel, out_features: int, in_features: int,
                                               bias: bool) -> None:
    if not kernel.supports(in_features, out_features):
        pytest.skip(f"the {kernel.layout} kernel does not take {out_features} outputs")
    weight, bias_tensor = packed(out_features, in_features, seed=out_features + in_features, bias=bias)
    generator = torch.Generator().manual_seed(1)
    for rows in range(1, matmul_cpu.MAX_ROWS + 1):
        x = (torch.randn(rows, in_features, generator=generator) * 3).to(torch.bfloat16)
        want = torch.ops.mkldnn._linear_pointwise(x, weight, bias_tensor, "none", [], "")
        assert torch.equal(kernel(x, address(weight), bias_tensor, out_features), want), rows


def test_any_thread_count_gives_the_same_bits(kernel: MatmulKernel) -> None:
    weight, bias = packed(960, 576, seed=0, bias=True)
    x = torch.randn(32, 576).to(torch.bfloat16)
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(kernel(x, address(weight), bias, 960))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(result, results[0]) for result in results)


def test_the_start_up_check_passes_onednns_weights_and_refuses_what_the_kernel_cannot_read(
        kernel: MatmulKernel) -> None:
    weight, bias = packed(576, 576, seed=2, bias=True)
    assert not kernel.differs_from_onednn(weight, bias, 576, 576)
    assert kernel.differs_from_onednn(weight, bias.float(), 576, 576)  # an fp32 bias
    smaller, _ = packed(544, 576, seed=2, bias=False)
    assert kernel.differs_from_onednn(smaller, None, 576, 576)  # another size than claimed


def test_shapes_and_rows_it_takes(kernel: MatmulKernel) -> None:
    assert kernel.supports(576, 49152) and not kernel.supports(100, 64)
    assert kernel.supports(576, 50257) == (kernel.layout == "avx512_bf16")  # AMX: outputs in blocks of 32 only
    assert [MatmulKernel.applies(torch.empty(rows, 8)) for rows in (0, 1, 32, 33)] == [False, True, True, False]


def test_packed_linear_takes_the_kernel_for_decode_rows_and_onednn_above(kernel: MatmulKernel,
                                                                         monkeypatch) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True, dtype=torch.bfloat16)
    layer = PackedLinear(linear)
    layer.cpu_kernel = kernel
    calls = []
    original = MatmulKernel.__call__
    monkeypatch.setattr(MatmulKernel, "__call__",
                        lambda self, *args: calls.append(args[0].shape[0]) or original(self, *args))
    for rows in (1, 16, 17, 150):
        x = torch.randn(2, rows, 64, dtype=torch.bfloat16)  # leading dims: 2 * rows rows
        assert torch.equal(layer(x), F.linear(x, linear.weight, linear.bias))
    assert calls == [2, 32]


@pytest.mark.skipif(not AMX, reason="this CPU has no AMX bf16")
def test_a_build_without_amx_code_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(matmul_cpu, "FLAGS", (*matmul_cpu.FLAGS, "-mno-amx-tile"))
    with pytest.raises(c_build.KernelBuildError, match="no AMX code"):
        matmul_cpu.load(directory=tmp_path)


def test_a_cpu_with_neither_amx_nor_avx512_bf16_is_refused_before_building(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(matmul_cpu, "cpu_flags", lambda: {"avx512f", "avx2"})
    with pytest.raises(c_build.KernelBuildError, match="neither AMX bf16 nor AVX512-BF16"):
        matmul_cpu.load(directory=tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(AMX, reason="this CPU has AMX: the AMX kernel is built")
def test_a_build_without_avx512_bf16_code_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(matmul_cpu, "FLAGS", (*matmul_cpu.FLAGS, "-mno-avx512bf16"))
    with pytest.raises(c_build.KernelBuildError, match="no AVX512-BF16 code"):
        matmul_cpu.load(directory=tmp_path)


@pytest.mark.skipif(not AMX, reason="this CPU has no AMX bf16")
def test_the_avx512_bf16_kernel_on_an_amx_cpu_fails_the_start_up_check(tmp_path, monkeypatch) -> None:
    """Where oneDNN packs for AMX, the kernel built for AVX512-BF16's layout computes something else: the check
    the engine runs at start must see it."""
    monkeypatch.setattr(matmul_cpu, "cpu_flags", lambda: cpu_flags() - c_build.AMX_FLAGS | {"avx512_bf16"})
    monkeypatch.setattr(matmul_cpu, "FLAGS", (*matmul_cpu.FLAGS, "-mno-amx-tile", "-mno-amx-bf16"))
    kernel = matmul_cpu.load(directory=tmp_path)
    assert kernel.layout == "avx512_bf16"
    weight, bias = packed(576, 576, seed=3, bias=False)
    assert kernel.differs_from_onednn(weight, bias, 576, 576)


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_engines_with_and_without_the_kernel_give_the_same_tokens(kind: str, tiny_models, make_engine) -> None:
    """qwen2: q/k/v biases and a tied LM head; llama: untied. Staggered requests make steps of every row count."""
    prompts = random_prompts(6, 3, 60, seed=4)
    tokens = {}
    for choice in ("kernel", "torch"):
        engine = make_engine(tiny_models[kind], dtype="bfloat16", cpu_matmul=choice, cpu_compile=False)
        layers = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
        assert layers and all((m.cpu_kernel is not None) == (choice == "kernel") for m in layers)
        finals = run_staggered(engine, prompts, greedy())
        tokens[choice] = [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]
    assert tokens["kernel"] == tokens["torch"]


def test_a_kernel_that_is_not_onednns_bit_for_bit_stays_off(tiny_models, make_engine, monkeypatch, caplog) -> None:
    """The engine compares each layer with oneDNN at start: where the kernel differs (another oneDNN's layout,
    say), every layer keeps oneDNN and the log says so."""
    original = MatmulKernel.__call__
    monkeypatch.setattr(MatmulKernel, "__call__", lambda self, *args: original(self, *args) * 1.5)
    engine = make_engine(tiny_models["llama"], dtype="bfloat16", cpu_matmul="kernel", cpu_compile=False)
    assert all(m.cpu_kernel is None for m in engine.runner.model.modules() if isinstance(m, PackedLinear))
    assert "not bit for bit oneDNN's" in caplog.text
