"""Tiny random PEFT LoRA adapters over the tiny test models, and what PEFT itself generates with them merged."""

from __future__ import annotations

from pathlib import Path

import torch

from .conftest import hf_generate

# name -> (rank, alpha, target modules, rsLoRA)
ADAPTERS = {
    "attn": (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "all": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], True),
    "mlp": (2, 4, ["gate_proj", "up_proj", "down_proj"], False),
    "qv": (4, 4, ["q_proj", "v_proj"], False),
}


def save_adapter(base_dir: Path, directory: Path, name: str, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    rank, alpha, targets, rslora = ADAPTERS[name]
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    # init_lora_weights=False: random A and B (PEFT's default zero B would make the adapter a no-op).
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, init_lora_weights=False)
    model = get_peft_model(base, config)
    with torch.no_grad():  # scaled so the adapters change greedy answers without drowning the base model
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.mul_(0.6)
    path = directory / name
    model.save_pretrained(path)
    return path


def peft_merged_greedy(base_dir: Path, adapter_dir: Path, prompts: list[list[int]], new_tokens: int
                       ) -> list[list[int]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return hf_generate(merged, prompts, new_tokens)
