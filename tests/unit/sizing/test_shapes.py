"""Model shapes: the KV formula, parameter counts, and reading a config dir or a GGUF."""

import json
from pathlib import Path

import pytest

from common.model_files import bundled_llm
from scripts.sizing.devices import BUILTIN_DEVICES, load_device
from scripts.sizing.shapes import BUILTIN_MODELS, load_shape


def test_kv_bytes_per_token_llama_3_8b_is_128_kib_in_bf16() -> None:
    # 2 (K, V) x 32 layers x 8 KV heads x 128 head dim x 2 bytes = 131072 bytes
    shape = load_shape("llama-3-8b")
    assert shape.kv_bytes_per_token("bf16") == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    assert shape.kv_bytes_per_token("fp8") == 64 * 1024


@pytest.mark.parametrize(("name", "billions"), [("llama-2-7b", 6.74), ("llama-3-8b", 8.03), ("llama-2-70b", 68.98),
                                                ("llama-3-70b", 70.55), ("qwen2.5-7b", 7.62)])
def test_parameter_counts_match_the_published_sizes(name: str, billions: float) -> None:
    assert BUILTIN_MODELS[name].params / 1e9 == pytest.approx(billions, abs=0.01)


def test_config_directory(tmp_path: Path) -> None:
    config = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
              "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = load_shape(str(tmp_path))
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (32, 8, 128)
    assert shape.params == BUILTIN_MODELS["llama-3-8b"].params


def test_mixture_of_experts_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_local_experts": 8, "num_attention_heads": 32}))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        load_shape(str(tmp_path))


def test_bundled_gguf_has_the_builtin_smollm2_shape() -> None:
    from_file = load_shape(str(bundled_llm()))
    builtin = load_shape("default")
    assert from_file.params == builtin.params
    assert from_file.kv_bytes_per_token("fp32") == builtin.kv_bytes_per_token("fp32") == 2 * 30 * 3 * 64 * 4


def test_unknown_names_say_what_is_known() -> None:
    with pytest.raises(ValueError, match="llama-2-7b"):
        load_shape("no-such-model")
    with pytest.raises(ValueError, match="h100-sxm"):
        load_device("no-such-gpu")


def test_device_table_and_profile_file(tmp_path: Path) -> None:
    assert set(BUILTIN_DEVICES) == {"h100-sxm", "h200", "a100-80g", "l40s"}
    assert load_device("H100").name == "h100-sxm"
    with pytest.raises(ValueError, match="no fp8"):
        load_device("a100-80g").compute_precision("fp8")
    profile = tmp_path / "gpu.json"
    profile.write_text(json.dumps({"name": "my-gpu", "memory_gb": 24, "bandwidth_gbs": 1000,
                                   "tflops": {"bf16": 160}}))
    device = load_device(str(profile))
    assert (device.name, device.kind, device.per_node) == ("my-gpu", "gpu", 1)
