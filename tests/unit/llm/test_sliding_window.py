"""Sliding-window models: the engine attends over the whole context, so it serves them only within the window,
where full attention is the same; a longer context is refused at load instead of being computed wrongly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.llm.config import ModelConfig
from services.llm.engine import SamplingParams

from .conftest import VOCAB, hf_generate, save_tiny_tokenizer

WINDOW = 16


def tiny_mistral(directory: Path, sliding_window: int | None) -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(4)
    model = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=512, sliding_window=sliding_window,
                                             bos_token_id=1, eos_token_id=2, pad_token_id=3, initializer_range=0.2,
                                             attn_implementation="eager"))
    model.save_pretrained(directory, safe_serialization=True)
    save_tiny_tokenizer(directory)
    return model.eval()


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    directory = tmp_path_factory.mktemp("tiny-mistral")
    return directory, tiny_mistral(directory, WINDOW)


def test_the_window_changes_what_transformers_computes(mistral: tuple[Path, torch.nn.Module]) -> None:
    """Why the engine must not serve past the window: the same weights without it give other tokens."""
    directory, windowed = mistral
    full = tiny_mistral(directory.parent / "full", None)
    prompt = [[(7 * i) % (VOCAB - 4) + 4 for i in range(40)]]
    assert hf_generate(windowed, prompt, 8) != hf_generate(full, prompt, 8)


def test_context_is_limited_to_the_window_and_matches_transformers(mistral: tuple[Path, torch.nn.Module],
                                                                   make_engine,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    directory, model = mistral
    with caplog.at_level("WARNING", logger="services.llm.engine.engine"):
        engine = make_engine(directory)
    assert engine.model_config.sliding_window == WINDOW
    assert engine.max_model_len == WINDOW and f"sliding window of {WINDOW} tokens" in caplog.text
    prompt = [5, 9, 13, 17, 21, 25, 29, 33]
    [out] = engine.generate([prompt], SamplingParams(max_tokens=WINDOW - len(prompt), temperature=0,
                                                     ignore_eos=True), use_tqdm=False)
    assert out.outputs[0].token_ids == hf_generate(model, [prompt], WINDOW - len(prompt))[0]
    with pytest.raises(ValueError, match=f"context length of {WINDOW}"):
        engine.add_request("past-window", prompt, SamplingParams(max_tokens=WINDOW))


def test_a_context_longer_than_the_window_is_refused_at_load(mistral: tuple[Path, torch.nn.Module],
                                                             make_engine) -> None:
    with pytest.raises(ValueError, match=f"max_model_len 64 is longer than the model's sliding attention window of "
                                         f"{WINDOW} tokens"):
        make_engine(mistral[0], max_model_len=64)
    assert make_engine(mistral[0], max_model_len=12).max_model_len == 12


BASE = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4}


@pytest.mark.parametrize(("hf", "window"), [
    ({"model_type": "mistral", "sliding_window": 4096}, 4096),
    ({"model_type": "mistral", "sliding_window": None}, None),  # Mistral v0.2+: full attention
    ({"model_type": "mistral"}, 4096),  # transformers' default for the key
    ({"model_type": "llama"}, None),
    ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}, None),
    ({"model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": True, "max_window_layers": 2}, 1024),
    ({"model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": True, "max_window_layers": 4}, None),
    ({"model_type": "qwen2", "sliding_window": 1024, "use_sliding_window": True,
      "layer_types": ["full_attention"] * 3 + ["sliding_attention"]}, 1024),
])
def test_sliding_window_is_read_as_transformers_applies_it(hf: dict, window: int | None) -> None:
    assert ModelConfig.from_hf({**BASE, **hf}).sliding_window == window
