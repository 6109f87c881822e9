"""Loads a model and its tokenizer from a local Hugging Face directory, a `.gguf` file, or a hub id.

GGUF weights are dequantized at load by transformers' reader, which also undoes llama.cpp's Q/K row
permutation; the tokenizer and chat template come from the file's metadata. Hub ids go through the
standard `huggingface_hub` download (offline under HF_HUB_OFFLINE=1, which the tests set).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.llm.config import ModelConfig
from services.llm.layers.int8_linear import quantize_linears_int8
from services.llm.layers.packed_linear import cpu_packing_available, pack_linears
from services.llm.models import build_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(slots=True)
class LoadedModel:
    name: str
    config: ModelConfig
    model: nn.Module
    tokenizer: Any  # a transformers tokenizer with its chat template
    eos_token_ids: set[int]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        # fp32 keeps CPU results equal to the reference; on GPU bf16 is the serving default.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)} or 'auto'")
    return DTYPES[dtype]


QUANTIZATIONS = ("none", "int8")


def load_model(model: str, device: torch.device, dtype: torch.dtype, quantization: str = "none",
               pack_cpu_weights: bool = True) -> LoadedModel:
    """`quantization`: the weight format of the decoder layers' projections, `none` (the dtype's) or `int8`
    (weight-only, per output channel, quantized here from the checkpoint's weights). `pack_cpu_weights`: on a
    CPU with native bf16, the remaining bf16 linear layers get oneDNN's packed layout (`packed_linear`)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        hf_config, weights, tokenizer = _read_gguf(path)
    else:
        if not path.is_dir():
            path = _download(model)
        hf_config, weights, tokenizer = _read_hf_directory(path)
    config = ModelConfig.from_hf(hf_config)
    log.info("building %s (%d layers, %d/%d heads) on %s in %s", config.model_type, config.num_layers,
             config.num_heads, config.num_kv_heads, device, dtype)
    net = build_on_device(config, device, dtype)
    net.load_weights(weights)
    net.eval()
    if quantization == "int8":
        saved = quantize_linears_int8(net)
        log.info("int8 weight-only quantization of the decoder projections: %.0f MiB less", saved / 2**20)
    if pack_cpu_weights and cpu_packing_available(device, dtype):
        log.info("%d linear layers packed for oneDNN's bf16 kernels", pack_linears(net))
    check_placement(net, device, dtype)
    return LoadedModel(name=_model_name(model), config=config, model=net, tokenizer=tokenizer,
                       eos_token_ids=_eos_token_ids(hf_config, tokenizer, path))


def build_on_device(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model with every parameter created directly on `device` in `dtype` (weights not loaded yet)."""
    with _default_dtype(dtype), device:
        return build_model(config)


def check_placement(net: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """The dtype policy, enforced at load: every parameter on `device` in `dtype`; buffers (the rotary table)
    on `device` in fp32. A tensor left elsewhere would reach a Triton kernel as a foreign pointer."""
    def misplaced(tensor: torch.Tensor, want: torch.dtype) -> bool:
        same_device = tensor.device.type == device.type and device.index in (None, tensor.device.index)
        return not same_device or tensor.dtype != want

    wrong = [f"{name} ({t.device}, {t.dtype})" for name, t in net.named_parameters()
             if misplaced(t, torch.int8 if name.endswith(".qweight") else dtype)]
    wrong += [f"{name} ({t.device}, {t.dtype})" for name, t in net.named_buffers() if misplaced(t, torch.float32)]
    if wrong:
        raise RuntimeError(f"model tensors not placed on {device} per the dtype policy: {', '.join(wrong[:5])}")


def _model_name(model: str) -> str:
    path = Path(model)
    return path.name if path.exists() else model


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    log.info("%s is not a local path; fetching it as a hub id", repo_id)
    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))  # ok-hub: only for an explicit hub id (SPEC §3)


def _read_hf_directory(path: Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor]], Any]:
    from transformers import AutoTokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json")
    hf_config = json.loads(config_file.read_text())
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({path / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no .safetensors weights")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return hf_config, _safetensors_weights(files), tokenizer


def _safetensors_weights(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, shard.get_tensor(name)


def _read_gguf(path: Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor]], Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = dict(load_gguf_checkpoint(str(path))["config"])
    # The reader maps GGUF tensor names through a model skeleton; a meta-device one costs no memory.
    skeleton_config = AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(skeleton_config)
    log.info("dequantizing %s", path.name)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf_config.setdefault("tie_word_embeddings", "lm_head.weight" not in parsed["tensors"])
    return hf_config, iter(parsed["tensors"].items()), tokenizer


def _eos_token_ids(hf_config: dict, tokenizer: Any, path: Path) -> set[int]:
    ids: set[int] = set()
    sources: list[Any] = [hf_config.get("eos_token_id"), tokenizer.eos_token_id]
    generation_config = path / "generation_config.json" if path.is_dir() else None
    if generation_config is not None and generation_config.is_file():
        sources.append(json.loads(generation_config.read_text()).get("eos_token_id"))
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list):
            ids.update(i for i in source if isinstance(i, int))
    return ids
