"""One file per model family; `build_model` picks the family from the config."""

from __future__ import annotations

from torch import nn

from services.llm.config import ModelConfig
from services.llm.models.llama import LlamaForCausalLM
from services.llm.models.qwen2 import Qwen2ForCausalLM

MODEL_FAMILIES: dict[str, type[LlamaForCausalLM]] = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}


def build_model(config: ModelConfig) -> nn.Module:
    return MODEL_FAMILIES[config.model_type](config)
