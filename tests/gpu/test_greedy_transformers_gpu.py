"""Greedy tokens on CUDA, through the Triton kernels and decode CUDA graphs in fp32, equal transformers' own
`generate` on the same GPU, for the tiny Llama (GQA), Qwen2 (biases) and llama3-rope (MQA) models, with the
requests arriving staggered (one before each step, as the CPU exactness test runs them) so prefills, chunked
prefills and decodes share steps."""

from __future__ import annotations

import os
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

    from tests.unit.llm.conftest import hf_generate

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return hf_generate(model.cuda(), prompts, NEW_TOKENS)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3"])
def test_staggered_greedy_equals_transformers_on_the_gpu(kind: str, models: dict[str, Path]) -> None:
    from services.llm.engine import EngineConfig, LLMEngine
    from tests.unit.llm.test_engine_greedy import assert_no_leaks, greedy, random_prompts, run_staggered

    prompts = random_prompts(8, 3, 70, seed=7)  # the CPU exactness test's prompts
    torch.backends.cuda.matmul.allow_tf32 = False  # both sides in true fp32
    expected = transformers_greedy(models[kind], prompts)

    # 64-token chunks split the longer prompts; a small pool, since other test files run beside this one.
    engine = LLMEngine(EngineConfig(model=str(models[kind]), device="cuda", dtype="float32",
                                    max_num_batched_tokens=64, num_kv_blocks=256))
    assert engine.hardware.kernels == "triton" and engine.runner.decode_graphs is not None
    finals = run_staggered(engine, prompts, greedy(NEW_TOKENS))
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == expected
    assert_no_leaks(engine)
