"""GGUF projections kept in their block format (LLM_GGUF_WEIGHTS=native) against the same file dequantized at
load: tiny random Llama models written as GGUF files with Q8_0, Q4_0, Q4_1 and Q4_K projections."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from services.llm.kernels import launches
from services.llm.kernels.dispatch import triton_everywhere
from services.llm.layers.gguf_linear import GGUFConcatLinear, GGUFLinear, block_format_counts
from services.llm.loader import load_model, parameter_count
from services.llm.perplexity import prompt_logits
from tests.unit.llm.kernels.triton_mode import requires_interpreter

from .gguf_files import HIDDEN, INTERMEDIATE, LAYERS, tokens, write_tiny_gguf
from .test_engine_greedy import greedy

FORMATS = ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]
CPU = torch.device("cpu")
PROMPT = list(range(3, 60, 2))


def random_prompts(count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, len(tokens()), (5 + 7 * i,), generator=generator).tolist() for i in range(count)]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-gguf")
    files = {fmt: write_tiny_gguf(root / f"tiny-{fmt}.gguf", fmt, seed=i) for i, fmt in enumerate(FORMATS[:3])}
    # K-quant super-blocks are 256 weights wide
    for i, fmt in enumerate(("Q4_K", "Q6_K")):
        files[fmt] = write_tiny_gguf(root / f"tiny-{fmt}.gguf", fmt, seed=3 + i, hidden=256, intermediate=256)
    # q/k/v in different formats (as in a Q4_K_M file): the fused q/k/v projection is two block matrices.
    files["mixed"] = write_tiny_gguf(root / "tiny-mixed.gguf", "Q4_0", seed=5, overrides={"attn_v": "Q8_0"})
    # Qwen2: q/k/v biases, loaded into the block-format layers after they are swapped in
    files["qwen2"] = write_tiny_gguf(root / "tiny-qwen2.gguf", "Q8_0", seed=6, architecture="qwen2")
    files["qwen2-mixed"] = write_tiny_gguf(root / "tiny-qwen2-mixed.gguf", "Q8_0", seed=7, architecture="qwen2",
                                           overrides={"attn_v": "Q4_1"})
    return files


def projections(model: nn.Module) -> dict[str, nn.Module]:
    return {f"{i}.{name}": module for i, layer in enumerate(model.model.layers)
            for name, module in (("qkv_proj", layer.self_attn.qkv_proj), ("o_proj", layer.self_attn.o_proj),
                                 ("gate_up_proj", layer.mlp.gate_up_proj), ("down_proj", layer.mlp.down_proj))}


@pytest.mark.parametrize("fmt", FORMATS)
def test_native_blocks_give_the_dequantized_logits(ggufs: dict[str, Path], fmt: str) -> None:
    native = load_model(str(ggufs[fmt]), CPU, torch.float32, gguf_weights="native")
    dequantized = load_model(str(ggufs[fmt]), CPU, torch.float32, gguf_weights="dequantize")
    kept = projections(native.model)
    assert len(kept) == 4 * LAYERS and all(isinstance(m, GGUFLinear) and m.fmt == fmt for m in kept.values())
    assert not any(isinstance(m, GGUFLinear) for m in projections(dequantized.model).values())
    hidden, intermediate = native.config.hidden_size, native.config.intermediate_size
    assert (hidden, intermediate) == ((256, 256) if fmt.endswith("_K") else (HIDDEN, INTERMEDIATE))
    packed = kept["0.gate_up_proj"].qweight
    assert packed.shape == (2 * intermediate, hidden if fmt in ("Q8_0", "Q6_K") else hidden // 2)
    torch.testing.assert_close(prompt_logits(native, PROMPT, CPU, torch.float32),
                               prompt_logits(dequantized, PROMPT, CPU, torch.float32), rtol=1e-6, atol=1e-6)
    assert parameter_count(native.model) == parameter_count(dequantized.model)
    assert block_format_counts(native.model) == {fmt: 4 * LAYERS} and block_format_counts(dequantized.model) == {}


def test_fused_parts_in_different_formats_run_side_by_side(ggufs: dict[str, Path]) -> None:
    native = load_model(str(ggufs["mixed"]), CPU, torch.float32, gguf_weights="native")
    dequantized = load_model(str(ggufs["mixed"]), CPU, torch.float32, gguf_weights="dequantize")
    kinds = {name.split(".")[1]: type(m).__name__ for name, m in projections(native.model).items()}
    assert kinds == {"qkv_proj": "GGUFConcatLinear", "o_proj": "GGUFLinear", "gate_up_proj": "GGUFLinear",
                     "down_proj": "GGUFLinear"}
    qkv = native.model.model.layers[0].self_attn.qkv_proj
    assert [(p.fmt, p.out_features) for p in qkv.parts] == [("Q4_0", HIDDEN + HIDDEN // 2), ("Q8_0", HIDDEN // 2)]
    assert block_format_counts(native.model) == {"Q4_0": 4 * LAYERS, "Q8_0": LAYERS}
    assert parameter_count(native.model) == parameter_count(dequantized.model)
    torch.testing.assert_close(prompt_logits(native, PROMPT, CPU, torch.float32),
                               prompt_logits(dequantized, PROMPT, CPU, torch.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("name", "layer"), [("qwen2", GGUFLinear), ("qwen2-mixed", GGUFConcatLinear)])
def test_qwen2_biases_reach_the_block_format_layers(ggufs: dict[str, Path], name: str, layer: type) -> None:
    native = load_model(str(ggufs[name]), CPU, torch.float32, gguf_weights="native")
    dequantized = load_model(str(ggufs[name]), CPU, torch.float32, gguf_weights="dequantize")
    assert native.config.model_type == "qwen2"
    qkv = native.model.model.layers[1].self_attn.qkv_proj
    assert type(qkv) is layer and qkv.bias is not None
    torch.testing.assert_close(qkv.bias, dequantized.model.model.layers[1].self_attn.qkv_proj.bias, rtol=0, atol=0)
    assert qkv.bias.abs().sum() > 0
    torch.testing.assert_close(prompt_logits(native, PROMPT, CPU, torch.float32),
                               prompt_logits(dequantized, PROMPT, CPU, torch.float32), rtol=1e-6, atol=1e-6)


def test_weight_choice(ggufs: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    auto = load_model(str(ggufs["Q4_1"]), CPU, torch.float32)  # no kernel on the CPU: dequantized
    assert not any(isinstance(m, GGUFLinear) for m in projections(auto.model).values())
    with pytest.raises(ValueError, match="cannot be combined"):
        load_model(str(ggufs["Q4_1"]), CPU, torch.float32, quantization="int8", gguf_weights="native")
    with pytest.raises(ValueError, match="unknown gguf_weights"):
        load_model(str(ggufs["Q4_1"]), CPU, torch.float32, gguf_weights="blocks")
    # Not a GGUF: the setting has nothing to act on.
    plain = load_model(str(tiny_models["llama"]), CPU, torch.float32, gguf_weights="native")
    assert not any(isinstance(m, GGUFLinear) for m in projections(plain.model).values())


@pytest.mark.parametrize("fmt", FORMATS)
def test_engine_greedy_tokens_equal(ggufs: dict[str, Path], make_engine, fmt: str) -> None:
    prompts = random_prompts(4, seed=7)
    runs = {}
    for weights in ("native", "dequantize"):
        engine = make_engine(ggufs[fmt], gguf_weights=weights)
        runs[weights] = [o.outputs[0].token_ids for o in engine.generate(prompts, greedy(10), use_tqdm=False)]
    assert runs["native"] == runs["dequantize"]


@requires_interpreter
@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
def test_engine_through_the_triton_kernel_gives_the_dequantized_tokens(ggufs: dict[str, Path], make_engine,
                                                                      fmt: str) -> None:
    prompts = random_prompts(3, seed=8)
    reference = make_engine(ggufs[fmt], gguf_weights="dequantize")
    want = [o.outputs[0].token_ids for o in reference.generate(prompts, greedy(6), use_tqdm=False)]
    with triton_everywhere(), launches.record() as recorded:
        engine = make_engine(ggufs[fmt], gguf_weights="native")
        got = [o.outputs[0].token_ids for o in engine.generate(prompts, greedy(6), use_tqdm=False)]
    assert got == want
    assert "_gguf_matmul_kernel" in {launch.kernel.split(":")[1] for launch in recorded}


def test_parameter_count_counts_weights_once(ggufs: dict[str, Path], tiny_models: dict[str, Path]) -> None:
    for model in (ggufs["Q4_1"], tiny_models["qwen2"]):  # both tie the LM head to the embeddings
        loaded = load_model(str(model), CPU, torch.float32)
        assert parameter_count(loaded.model) == sum(p.numel() for p in loaded.model.parameters())
        # bf16 on a CPU with native bf16: oneDNN-packed weights, the tied LM head packed as a copy of its own
        packed = load_model(str(model), CPU, torch.bfloat16)
        assert parameter_count(packed.model) == parameter_count(loaded.model)


@pytest.mark.parametrize("name", ["Q4_1", "mixed"])
def test_tensors_read_one_at_a_time_equal_transformers_reader(ggufs: dict[str, Path], name: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from services.llm import gguf_file

    hf_config, _ = gguf_file.read_metadata(ggufs[name])
    ours = dict(gguf_file.dequantized_tensors(ggufs[name]))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    theirs = load_gguf_checkpoint(str(ggufs[name]), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert ours.keys() == theirs.keys() and len(ours) == 2 + 9 * LAYERS  # embeddings, norm; 7 projections, 2 norms
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    skipped = dict(gguf_file.dequantized_tensors(ggufs[name], skip={"blk.0.attn_q.weight"}))
    assert set(ours) - set(skipped) == {"model.layers.0.self_attn.q_proj.weight"}
