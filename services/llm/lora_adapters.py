"""The LoRA adapters a server holds: PEFT adapters read from disk into the slots of the model's LoRA layers.

An adapter is a PEFT directory (`adapter_config.json` + `adapter_model.safetensors`) trained on the base
model's q/k/v/o and gate/up/down projections (any subset). Each loaded adapter owns one slot until it is
unloaded; its `cache_salt` seeds the prefix cache's block hashes, so KV computed under one adapter is only
ever reused by requests for the same load of the same adapter.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from services.llm.layers.lora import LoRALinear

# PEFT's module name → (our layer inside a decoder layer, which part of a fused projection).
TARGETS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
           "v_proj": ("self_attn.qkv_proj", 2), "o_proj": ("self_attn.o_proj", 0),
           "gate_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1), "down_proj": ("mlp.down_proj", 0)}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(slots=True, frozen=True)
class LoRAAdapter:
    name: str
    path: str
    slot: int
    rank: int
    cache_salt: bytes


@dataclass(slots=True)
class PeftAdapter:
    rank: int
    pairs: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]  # (layer path, part) -> (A, B × scaling)


def parse_lora_modules(spec: str) -> dict[str, str]:
    """`name=path,name=path` (LLM_LORA_MODULES) as {name: path}."""
    modules: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"LoRA module {item!r} is not name=path")
        if name.strip() in modules:
            raise ValueError(f"LoRA module name {name.strip()!r} is given twice")
        modules[name.strip()] = path.strip()
    return modules


def read_peft_adapter(path: Path) -> PeftAdapter:
    from safetensors.torch import load_file

    if not path.is_dir():
        raise ValueError(f"LoRA adapter path {str(path)!r} is not a directory on the server")
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not a PEFT LoRA adapter: it has no adapter_config.json file")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: only LoRA adapters are served, not {config.get('peft_type')}")
    for unsupported in ("use_dora", "modules_to_save"):
        if config.get(unsupported):
            raise ValueError(f"{path}: adapters with {unsupported} are not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"{path}: adapters that train biases are not supported")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module ranks (rank_pattern/alpha_pattern) are not supported")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weights_file = path / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ValueError(f"{path} has no adapter_model.safetensors")
    halves: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        match = _KEY.search(key)
        if match is None or match.group(2) not in TARGETS:
            raise ValueError(f"{path}: adapter tensor {key!r} targets a module this server cannot adapt "
                             f"(supported: {sorted(TARGETS)})")
        layer, part = TARGETS[match.group(2)]
        halves.setdefault((f"model.layers.{match.group(1)}.{layer}", part), {})[match.group(3)] = tensor.float()
    pairs = {}
    for where, half in halves.items():
        if set(half) != {"A", "B"}:
            raise ValueError(f"{path}: {where[0]} has a lora_A without its lora_B or the other way round")
        pairs[where] = (half["A"], half["B"] * scaling)
    return PeftAdapter(rank=rank, pairs=pairs)


class LoRAAdapters:
    def __init__(self, layers: dict[str, LoRALinear], max_loras: int) -> None:
        self.layers, self.max_loras = layers, max_loras
        self.adapters: dict[str, LoRAAdapter] = {}
        self._loads = itertools.count()

    def get(self, name: str) -> LoRAAdapter | None:
        return self.adapters.get(name)

    def load(self, name: str, path: str, peft: PeftAdapter) -> LoRAAdapter:
        """Puts an adapter read by `read_peft_adapter` into a free slot under `name`."""
        if name in self.adapters:
            raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
        used = {adapter.slot for adapter in self.adapters.values()}
        free = [slot for slot in range(self.max_loras) if slot not in used]
        if not free:
            raise ValueError(f"all {self.max_loras} LoRA slots are in use (LLM_MAX_LORAS); unload one first")
        slot = free[0]
        unknown = [layer for layer, _part in peft.pairs if layer not in self.layers]
        if unknown:
            raise ValueError(f"{path}: the adapter targets layers the model does not have, e.g. {unknown[0]}")
        try:
            for (where, part), (a, b) in peft.pairs.items():
                self.layers[where].set_adapter(slot, part, a, b)
        except ValueError:
            self._clear(slot)
            raise
        salt = hashlib.sha256(f"lora:{name}:{path}:{next(self._loads)}".encode()).digest()
        adapter = LoRAAdapter(name=name, path=path, slot=slot, rank=peft.rank, cache_salt=salt)
        self.adapters[name] = adapter
        return adapter

    def unload(self, name: str) -> LoRAAdapter:
        adapter = self.adapters.pop(name)
        self._clear(adapter.slot)
        return adapter

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear(slot)
