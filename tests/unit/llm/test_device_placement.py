"""Device placement without a GPU: the `meta` device stands in for CUDA.

Every parameter and buffer of every supported architecture must be created on the engine's device, in the
dtype policy (parameters in the engine's dtype, the rotary table in fp32): a tensor left on the CPU reaches a
Triton kernel as a host pointer at the first forward pass. Then the start-up sequence runs as far as it can
against the profiles of GPUs this machine does not have: hardware profile → load → KV budget → the KV pool
and the decode graphs' input buffers.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from services.llm.config import ModelConfig
from services.llm.engine.gpu_memory import plan_kv_budget
from services.llm.engine.runner import allocate_kv_cache, decode_graph_buffers, kv_bytes_per_block
from services.llm.kernels.cuda_graphs import DecodeGraphRunner
from services.llm.kernels.hardware import cuda_profile
from services.llm.loader import build_on_device, load_model

from .conftest import save_tiny_model, save_tiny_tokenizer

META = torch.device("meta")
GIB = 2**30
# torch.cuda.get_device_properties fields of GPUs the tests stand in.
L4 = SimpleNamespace(name="NVIDIA L4", major=8, minor=9, total_memory=23034 * 2**20, multi_processor_count=58)
H100 = SimpleNamespace(name="NVIDIA H100 80GB HBM3", major=9, minor=0, total_memory=81559 * 2**20,
                       multi_processor_count=132)
T4 = SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15095 * 2**20, multi_processor_count=40)
QWEN25_7B = {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
             "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False}


def save_llama(directory: Path, name: str, **config: object) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=256, **config))
    path = directory / name
    model.save_pretrained(path, safe_serialization=True)
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def architectures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("placement")
    return {
        "llama MHA, tied": save_llama(root, "mha", num_key_value_heads=4, tie_word_embeddings=True),
        "llama GQA, untied": save_tiny_model(root, "llama"),
        "llama3 rope, MQA": save_tiny_model(root, "llama3"),
        "qwen2 biases, tied": save_tiny_model(root, "qwen2"),
    }


def assert_placed(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    assert params and buffers
    wrong = {name: (t.device, t.dtype) for name, t in params.items() if (t.device, t.dtype) != (device, dtype)}
    wrong |= {name: (t.device, t.dtype) for name, t in buffers.items()
              if (t.device, t.dtype) != (device, torch.float32)}
    assert not wrong, wrong


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind", ["llama MHA, tied", "llama GQA, untied", "llama3 rope, MQA", "qwen2 biases, tied"])
def test_every_tensor_is_built_on_the_engine_device(architectures: dict[str, Path], kind: str,
                                                    dtype: torch.dtype) -> None:
    loaded = load_model(str(architectures[kind]), META, dtype)
    assert_placed(loaded.model, META, dtype)
    rotary = loaded.model.model.layers[0].self_attn.rotary
    assert rotary.cos_sin_cache.shape == (loaded.config.max_position_embeddings, loaded.config.head_dim)
    assert all(layer.self_attn.rotary is rotary for layer in loaded.model.model.layers)  # one table, shared
    tied = loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    assert tied == loaded.config.tie_word_embeddings
    if kind.startswith("qwen2"):
        assert loaded.model.model.layers[0].self_attn.qkv_proj.bias.device == META


@pytest.mark.parametrize("gpu", [L4, H100, T4], ids=["L4 sm89", "H100 sm90", "T4 sm75"])
def test_start_up_sequence_against_a_gpu_profile(architectures: dict[str, Path], gpu: SimpleNamespace) -> None:
    profile = cuda_profile(0, gpu)
    assert profile.device == "cuda:0" and profile.use_cuda_graphs and profile.kv_block_size == 16
    assert profile.dtype == (torch.bfloat16 if (gpu.major, gpu.minor) >= (8, 0) else torch.float16)

    loaded = load_model(str(architectures["llama GQA, untied"]), META, profile.dtype)
    assert_placed(loaded.model, META, profile.dtype)

    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    context = 512 * 2**20  # what the CUDA context takes before the engine allocates anything
    budget = plan_kv_budget(total=gpu.total_memory, free=gpu.total_memory - context - weights, share=0.85,
                            peak=weights + 64 * 2**20, held=weights)
    num_blocks = budget.bytes // kv_bytes_per_block(loaded.config, profile.kv_block_size, profile.dtype)
    assert num_blocks > 1000

    pool = allocate_kv_cache(loaded.model, loaded.config, 1024, profile.kv_block_size, profile.dtype, META)
    for layer, (k_cache, v_cache) in zip(loaded.model.attention_layers(), pool, strict=True):
        assert layer.k_cache is k_cache and layer.v_cache is v_cache
        assert (k_cache.device, k_cache.dtype, v_cache.device, v_cache.dtype) == (META, profile.dtype) * 2
        assert k_cache.shape == (1024, 16, loaded.config.num_kv_heads, loaded.config.head_dim)
    buffers = decode_graph_buffers(256, 256 // profile.kv_block_size, META)
    assert all(t.device == META for t in buffers.values())
    graphs = DecodeGraphRunner(lambda inputs: inputs["input_ids"], buffers)
    assert not graphs.enabled  # capture itself needs CUDA (tests/gpu)


def test_a_7b_model_on_a_24gb_card_gets_a_kv_pool_from_what_is_left() -> None:
    config = ModelConfig.from_hf(QWEN25_7B)
    model = build_on_device(config, META, torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 15.0e9 < weights < 15.5e9  # Qwen2.5-7B in bf16
    per_token = kv_bytes_per_block(config, 16, torch.bfloat16) // 16
    assert per_token == 28 * 2 * 4 * 128 * 2  # 56 KiB

    # An upper estimate of the warm-up step: a 2048-token prefill, then 256 rows of top-p sampling over 152k tokens.
    step = int(1.5 * GIB)
    total, context = L4.total_memory, 512 * 2**20

    def pool_tokens(share: float, others: int = 0) -> tuple[int, str]:
        free = total - context - others - weights
        budget = plan_kv_budget(total=total, free=free, share=share, peak=weights + step, held=weights)
        return budget.bytes // per_token, budget.limited_by

    tokens, limited_by = pool_tokens(0.85)
    assert limited_by == "share" and tokens > 32768  # the whole context of one request, and more
    # Sharing the card with embed, rerank and the retriever (compose gives the llm 0.75), the pool holds less than
    # one full-length request: the engine still starts, serving the context the pool holds, instead of failing.
    tokens, _ = pool_tokens(0.75)
    assert 0 < tokens < 32768
    # Other processes took more than their share: the pool shrinks to what is really free.
    tokens, limited_by = pool_tokens(0.85, others=3 * GIB)
    assert limited_by == "free memory" and tokens > 0
    # Below the weights and the step, it fails at start-up, saying which setting to change.
    with pytest.raises(ValueError, match=r"LLM_GPU_MEMORY_UTILIZATION=0.65 .* nothing is left for the KV cache"):
        pool_tokens(0.65)
