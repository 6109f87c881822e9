"""CPU bf16 linear layers in oneDNN's packed layout: the same numbers as `F.linear`, in the engine too."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from services.llm.layers.lora import LoRALinear
from services.llm.layers.packed_linear import PackedLinear, cpu_packing_available, pack_linears

from .test_engine_greedy import greedy, random_prompts, run_staggered

pytestmark = pytest.mark.skipif(not cpu_packing_available(torch.device("cpu"), torch.bfloat16),
                                reason="this CPU has no native bf16 oneDNN kernels")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 600])
def test_packed_linear_equals_f_linear_bit_for_bit(rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(96, 160, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    packed = PackedLinear(linear)
    assert packed.packed_weight.layout == torch._mkldnn
    assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias))
    assert torch.equal(packed(x[None])[0], F.linear(x, linear.weight, linear.bias))  # leading dims kept


def test_pack_linears_swaps_every_linear_including_a_tied_head() -> None:
    model = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16), nn.Sequential(nn.Linear(8, 4, dtype=torch.bfloat16)))
    assert pack_linears(model) == 2
    assert not any(isinstance(module, nn.Linear) for module in model.modules())


def test_engine_packs_bf16_linears_on_cpu_with_unchanged_greedy_output(tiny_models: dict[str, Path],
                                                                       make_engine) -> None:
    prompts = random_prompts(5, 3, 60, seed=3)
    outputs, engines = {}, {}
    for packing in (True, False):
        # qwen2: q/k/v biases and a tied LM head; LoRA slots wrap the packed projections.
        engine = make_engine(tiny_models["qwen2"], dtype="bfloat16", cpu_weight_packing=packing, max_loras=1,
                             cpu_compile=False)
        finals = run_staggered(engine, prompts, greedy())
        outputs[packing] = [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]
        engines[packing] = engine
    model = engines[True].runner.model
    assert not any(isinstance(module, nn.Linear) for module in model.modules())
    assert isinstance(model.lm_head, PackedLinear)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj, LoRALinear)
    assert isinstance(model.model.layers[0].self_attn.qkv_proj.base, PackedLinear)
    assert isinstance(engines[False].runner.model.lm_head, nn.Linear)
    assert outputs[True] == outputs[False]
