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


def chat_prompts(engine: LLMEngine) -> list[list[int]]:
    texts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False) for q in QUESTIONS]
    return [engine.tokenizer(t)["input_ids"] for t in texts]


def reference_model(gguf_path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=dtype)


# Two GGUF dequantizations (ours and transformers') dominate: minutes on a busy 2-core machine.
@pytest.mark.slow
def test_bundled_gguf_greedy_matches_transformers(gguf_path) -> None:
    engine = LLMEngine(EngineConfig(model=str(gguf_path), device="cpu", dtype="float32"))
    assert engine.model_config.num_heads == 9 and engine.model_config.num_kv_heads == 3
    assert engine.eos_token_ids == {engine.tokenizer.convert_tokens_to_ids("<|im_end|>")}
    prompt_ids = chat_prompts(engine)
    outputs = engine.generate(prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)

    reference = reference_model(gguf_path, torch.float32)
    with torch.inference_mode():
        for ids, output in zip(prompt_ids, outputs, strict=True):
            want = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                      pad_token_id=engine.tokenizer.pad_token_id or 0)[0, len(ids):].tolist()
            assert output.outputs[0].token_ids == want
    assert "Paris" in engine.tokenizer.decode(outputs[0].outputs[0].token_ids)


# bf16 keeps 8 bits of mantissa: two implementations with different (equally valid) summation orders agree
# token for token except where the model itself is undecided, i.e. where transformers' own top two logits lie
# within a couple of bf16 rounding steps of each other; there the sequences may part, and only there.
BF16_NEAR_TIE_ULPS = 2


@pytest.mark.slow
def test_bundled_gguf_bf16_greedy_matches_transformers_bf16(gguf_path) -> None:
    engine = LLMEngine(EngineConfig(model=str(gguf_path), device="cpu", dtype="bfloat16"))
    assert engine.dtype == torch.bfloat16
    prompt_ids = chat_prompts(engine)
    outputs = engine.generate(prompt_ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)

    reference = reference_model(gguf_path, torch.bfloat16)
    matched = 0
    with torch.inference_mode():
        for ids, output in zip(prompt_ids, outputs, strict=True):
            run = reference.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True,
                                     pad_token_id=engine.tokenizer.pad_token_id or 0)
            want, got = run.sequences[0, len(ids):].tolist(), output.outputs[0].token_ids
            same = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), min(len(got),
                                                                                                   len(want)))
            matched += same
            if same < len(want):
                top2 = run.logits[same][0].float().topk(2).values
                ulp = 2.0 ** (torch.floor(torch.log2(top2[0].abs())) - 7)
                assert top2[0] - top2[1] <= BF16_NEAR_TIE_ULPS * ulp, (
                    f"diverged at token {same} where transformers was sure: {got} vs {want}")
    assert matched >= len(prompt_ids) * NEW_TOKENS // 2
    assert "Paris" in engine.tokenizer.decode(outputs[0].outputs[0].token_ids)
