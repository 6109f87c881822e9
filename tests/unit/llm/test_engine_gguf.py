"""The bundled SmolLM2 GGUF: our loader and engine against transformers loading the same file."""

from __future__ import annotations

import pytest
import torch

from common.model_files import ModelNotFound, bundled_llm
from services.llm.engine import EngineConfig, LLMEngine, SamplingParams

QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "List three primary colors.",
             "Explain what a CPU does in one sentence."]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return bundled_llm()
    except ModelNotFound as missing:
        pytest.skip(str(missing))


# Two GGUF dequantizations (ours and transformers') dominate: minutes on a busy 2-core machine.
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bundled_gguf_greedy_matches_transformers(gguf_path, dtype: torch.dtype) -> None:
    """Token for token against transformers in the same dtype (bf16 is the default on CPUs with AMX)."""
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(model=str(gguf_path), device="cpu", dtype=str(dtype).removeprefix("torch.")))
    assert engine.dtype == dtype
    assert engine.model_config.num_heads == 9 and engine.model_config.num_kv_heads == 3
    assert engine.eos_token_ids == {engine.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                    tokenize=False) for q in QUESTIONS]
    prompt_ids = [engine.tokenizer(p)["input_ids"] for p in prompts]
    outputs = engine.generate(prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)

    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)
    with torch.inference_mode():
        for ids, output in zip(prompt_ids, outputs, strict=True):
            want = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      pad_token_id=engine.tokenizer.pad_token_id or 0)[0, len(ids):].tolist()
            assert output.outputs[0].token_ids == want
    assert "Paris" in engine.tokenizer.decode(outputs[0].outputs[0].token_ids)
