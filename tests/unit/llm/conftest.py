"""Tiny random-weight models saved as real Hugging Face directories, and engines built over them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 384
WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def save_tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3} | {w: i + 4 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(directory)


def save_tiny_model(directory: Path, kind: str) -> Path:
    """`kind`: "llama" (GQA 4/2, untied), "qwen2" (q/k/v biases, tied), "llama3" (llama3 RoPE scaling, MQA)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                  pad_token_id=3, initializer_range=0.2)
    torch.manual_seed({"llama": 1, "qwen2": 2, "llama3": 3}[kind])
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common))
    elif kind == "llama3":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, rope_parameters=scaling, **common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **common))
        with torch.no_grad():  # random init leaves biases at zero; make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    path = directory / kind
    model.save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-llms")
    return {kind: save_tiny_model(root, kind) for kind in ("llama", "qwen2", "llama3")}


def hf_greedy(model_dir: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """What transformers' own `generate` produces, greedy, fp32, one prompt at a time (no padding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return hf_generate(model, prompts, max_new_tokens)


def hf_generate(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    results = []
    with torch.inference_mode():
        for prompt in prompts:
            out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=3)
            results.append(out[0, len(prompt):].tolist())
    return results


def kv_gib_for_blocks(model_dir: Path, num_blocks: int, block_size: int = 16) -> float:
    """The `kv_cache_gib` that buys exactly `num_blocks` blocks for a tiny model (fp32)."""
    import json

    from services.llm.config import ModelConfig
    from services.llm.engine.runner import kv_bytes_per_block

    config = ModelConfig.from_hf(json.loads((model_dir / "config.json").read_text()))
    return num_blocks * kv_bytes_per_block(config, block_size, torch.float32) / 2**30


@pytest.fixture(scope="session")
def smol_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random llama with SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from common.model_files import bundled_llm

    gguf = bundled_llm()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    torch.manual_seed(11)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         initializer_range=0.2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("smol-tiny")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def make_engine() -> Callable[..., object]:
    from services.llm.engine import EngineConfig, LLMEngine

    def build(model_dir: Path, **overrides: object) -> LLMEngine:
        # fp32 unless a test asks otherwise: the exactness oracle is transformers in fp32.
        return LLMEngine(EngineConfig(model=str(model_dir), device="cpu", **{"dtype": "float32", **overrides}))

    return build


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Tiny models gain nothing from threads, and on a shared, oversubscribed CPU every parallel op waits
    for a second thread to be scheduled (measured 10x slower); restore the setting for other suites."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
