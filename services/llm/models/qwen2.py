"""Qwen2 / Qwen2.5: the Llama layout with biases on the Q/K/V projections (none on the output projection).

`ModelConfig.from_hf` sets those biases for Qwen2, so the Llama layers build it unchanged.
"""

from __future__ import annotations

from services.llm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
