"""The architecture facts the engine needs, read from a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


@dataclass(slots=True, frozen=True)
class ModelConfig:
    model_type: str  # the model family file that builds it: "llama" or "qwen2"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    # Sliding-window attention (Mistral; Qwen2 with use_sliding_window): the window of the layers that use one,
    # None when every layer attends to the whole context. The engine serves contexts up to the window only.
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        model_type = hf.get("model_type", "")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported model type {model_type!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        family = SUPPORTED_ARCHITECTURES[model_type]
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope_scaling = hf.get("rope_scaling") or None
        rope_theta = hf.get("rope_theta")
        # transformers 5 moves theta and scaling into `rope_parameters`.
        rope_parameters = hf.get("rope_parameters") or {}
        if rope_theta is None:
            rope_theta = rope_parameters.get("rope_theta", 10000.0)
        if rope_scaling is None and rope_parameters.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        if rope_scaling is not None and rope_scaling.get("rope_type", rope_scaling.get("type")) in (None, "default"):
            rope_scaling = None
        return cls(
            model_type=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and no output bias; Llama's `attention_bias` covers all four.
            qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
            o_bias=family != "qwen2" and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=_sliding_window(model_type, hf),
        )


def _sliding_window(model_type: str, hf: dict[str, Any]) -> int | None:
    """The attention window transformers would apply to some layer of this config, if any."""
    if model_type == "mistral":
        window = hf.get("sliding_window", 4096)  # transformers' MistralConfig default when the key is absent
    elif model_type == "qwen2" and hf.get("use_sliding_window"):
        window = hf.get("sliding_window", 4096)
        layer_types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                                else "full_attention" for i in range(hf["num_hidden_layers"])]
        if "sliding_attention" not in layer_types:
            window = None
    else:
        window = None
    return int(window) if window else None
