"""Greedy tokens on CUDA, through the Triton kernels and decode CUDA graphs in fp32, equal transformers' own
`generate` on the same GPU, for the tiny Llama (GQA), Qwen2 (biases) and llama3-rope (MQA) models, with the
requests arriving staggered so prefills, chunked prefills and decodes share steps."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled Triton, not the interpreter"),
]

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.unit.llm.conftest import save_tiny_model

    root = tmp_path_factory.mktemp("tiny-llms")
    return {kind: save_tiny_model(root, kind) for kind in ("llama", "qwen2", "llama3")}


def transformers_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' `generate` on the GPU, fp32, eager attention, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").cuda()
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=3)
            results.append(out[0, len(prompt):].tolist())
    return results


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3"])
def test_staggered_greedy_equals_transformers_on_the_gpu(kind: str, models: dict[str, Path]) -> None:
    from services.llm.engine import EngineConfig, LLMEngine, SamplingParams

    rng = random.Random(7)
    prompts = [[rng.randrange(4, 384) for _ in range(rng.randint(3, 70))] for _ in range(8)]
    torch.backends.cuda.matmul.allow_tf32 = False  # both sides in true fp32
    expected = transformers_greedy(models[kind], prompts)

    # 64-token chunks split the longer prompts; a small pool, since other test files run beside this one.
    engine = LLMEngine(EngineConfig(model=str(models[kind]), device="cuda", dtype="float32",
                                    max_num_batched_tokens=64, num_kv_blocks=256))
    assert engine.hardware.kernels == "triton" and engine.runner.decode_graphs is not None
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0)
    finals = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        if pending:  # one arrival before each step
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output.outputs[0].token_ids
    assert [finals[f"r{i}"] for i in range(len(prompts))] == expected
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
