"""Weight-only int8: the CPU kernel equals its reference, the engine's greedy output equals transformers running
the same dequantized weights, and the bundled model's perplexity stays within 1% of its own dtype's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.model_files import bundled_llm
from services.llm.kernels import launches
from services.llm.kernels.dispatch import triton_everywhere
from services.llm.kernels.int8_matmul import int8_matmul, int8_matmul_reference, quantize_int8_per_channel
from services.llm.loader import load_model
from services.llm.perplexity import perplexity
from tests.unit.llm.kernels.triton_mode import requires_interpreter

from .conftest import hf_generate
from .test_engine_greedy import greedy, random_prompts

# A fixed text (not from any dataset) of a few hundred tokens, in the register of the RAG sources.
TEXT = (
    "The river rises in the northern hills, where snowmelt feeds a chain of small lakes before the water turns "
    "south. For most of its length it runs through farmland, and the towns along its banks grew up around mills "
    "that used its current to grind grain. In the nineteenth century a canal was dug beside the river so that "
    "barges could carry coal to the coast, and for a time the canal carried more freight than any road in the "
    "region. The railway arrived in 1868 and within twenty years the canal had fallen out of use. Today the "
    "towpath is a walking trail, and the old locks are kept by volunteers who open them for pleasure boats in "
    "summer. The river itself is known for its trout, and fishing permits are sold at the post office in each "
    "village. Floods are rare but severe: the worst, in the spring of 1947, covered the lower town to a depth of "
    "two metres and led to the building of the embankments that line the river today. A museum in the former "
    "mill house tells the story of the valley, from the first farms to the closing of the last factory in 1989."
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_int8_matmul_matches_its_reference(dtype: torch.dtype, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    q, scale = quantize_int8_per_channel(torch.randn(96, 64, generator=generator))
    x = torch.randn(rows, 64, generator=generator).to(dtype)
    expected = x.float() @ (q.float() * scale[:, None]).T
    got = int8_matmul(x, q, scale.to(dtype)).float()
    reference = int8_matmul_reference(x, q, scale.to(dtype)).float()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())
    assert torch.allclose(reference, expected, rtol=tolerance, atol=tolerance * expected.abs().max().item())


def test_int8_engine_matches_transformers_on_the_dequantized_weights(tiny_models: dict[str, Path],
                                                                      make_engine) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models["llama"]
    prompts = random_prompts(4, 5, 40, seed=31)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # the weights int8 holds, widened back: what the engine computes with
        for layer in hf.model.layers:
            for proj in (*(getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                         *(getattr(layer.mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))):
                q, scale = quantize_int8_per_channel(proj.weight)
                proj.weight.copy_(q.float() * scale[:, None])
    expected = hf_generate(hf, prompts, 12)
    engine = make_engine(model_dir, quantization="int8")
    outputs = engine.generate(prompts, greedy(12), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert sum(p.numel() for n, p in engine.runner.model.named_parameters() if n.endswith("qweight")) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_perplexity_within_one_percent_on_the_bundled_model(dtype: torch.dtype) -> None:
    device = torch.device("cpu")
    results = {}
    for quantization in ("none", "int8"):
        loaded = load_model(str(bundled_llm()), device, dtype, quantization)
        tokens = loaded.tokenizer(TEXT)["input_ids"]
        results[quantization] = perplexity(loaded, tokens, device, dtype)
    assert len(tokens) > 150
    assert abs(results["int8"] / results["none"] - 1) < 0.01, results


@requires_interpreter
def test_int8_engine_through_the_triton_kernel_gives_the_reference_tokens(tiny_models: dict[str, Path],
                                                                          make_engine) -> None:
    prompts = random_prompts(3, 5, 20, seed=32)
    want = [o.outputs[0].token_ids for o in make_engine(tiny_models["llama"], quantization="int8").generate(
        prompts, greedy(6), use_tqdm=False)]
    with triton_everywhere(), launches.record() as recorded:
        engine = make_engine(tiny_models["llama"], quantization="int8")
        got = [o.outputs[0].token_ids for o in engine.generate(prompts, greedy(6), use_tqdm=False)]
    assert got == want
    assert "_int8_matmul_kernel" in {launch.kernel.split(":")[1] for launch in recorded}
