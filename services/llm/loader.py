"""Loads a model and its tokenizer from a local Hugging Face directory, a `.gguf` file, or a hub id.

GGUF tensors are dequantized one at a time as transformers' reader does it, which also undoes llama.cpp's Q/K
row permutation (`gguf_file.py`); the tokenizer and chat template come from the file's metadata. Decoder
projections in Q8_0, Q4_0, Q4_1, Q4_K or Q6_K are kept in the file's own blocks instead where a kernel reads them on
the device (`gguf_weights`, see `gguf_blocks.py`), and those are never dequantized. Hub ids go through the
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
from services.llm.kernels.dispatch import use_triton_on
from services.llm.layers.fp8_linear import quantize_linears_fp8
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


QUANTIZATIONS = ("none", "int8", "fp8")
GGUF_WEIGHTS = ("auto", "native", "dequantize")


def load_model(model: str, device: torch.device, dtype: torch.dtype, quantization: str = "none",
               pack_cpu_weights: bool = True, gguf_weights: str = "auto") -> LoadedModel:
    """`quantization`: the weight format of the decoder layers' projections, `none` (the dtype's), `int8` or
    `fp8` (e4m3) (weight-only, per output channel, quantized here from the checkpoint's weights).
    `pack_cpu_weights`: on a CPU with native bf16, the remaining bf16 linear layers get oneDNN's packed layout
    (`packed_linear`).
    `gguf_weights`: for a `.gguf`, `native` keeps Q8_0/Q4_0/Q4_1/Q4_K/Q6_K projections in their blocks, `dequantize`
    widens every tensor to `dtype`, `auto` is `native` where a kernel reads the blocks (Triton on CUDA) and
    `dequantize` elsewhere."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; choose one of {QUANTIZATIONS}")
    if gguf_weights not in GGUF_WEIGHTS:
        raise ValueError(f"unknown gguf_weights {gguf_weights!r}; choose one of {GGUF_WEIGHTS}")
    if gguf_weights == "native" and quantization != "none":
        raise ValueError(f"gguf_weights=native keeps the file's own blocks; it cannot be combined with "
                         f"quantization={quantization!r}")
    path = Path(model)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        from services.llm import gguf_file

        hf_config, tokenizer = gguf_file.read_metadata(path)
    else:
        if not path.is_dir():
            path = _download(model)
        hf_config, weights, tokenizer = _read_hf_directory(path)
    config = ModelConfig.from_hf(hf_config)
    log.info("building %s (%d layers, %d/%d heads) on %s in %s", config.model_type, config.num_layers,
             config.num_heads, config.num_kv_heads, device, dtype)
    net = build_on_device(config, device, dtype)
    if path.suffix == ".gguf":
        kept: set[str] = set()
        if quantization == "none" and (gguf_weights == "native" or (gguf_weights == "auto" and use_triton_on(device))):
            from services.llm.gguf_blocks import keep_gguf_blocks

            kept = keep_gguf_blocks(net, path)
        weights = gguf_file.dequantized_tensors(path, skip=kept)
    net.load_weights(weights)
    net.eval()
    loaded = LoadedModel(name=_model_name(model), config=config, model=net, tokenizer=tokenizer,
                         eos_token_ids=_eos_token_ids(hf_config, tokenizer, path))
    if quantization == "int8":
        saved = quantize_linears_int8(net)
        log.info("int8 weight-only quantization of the decoder projections: %.0f MiB less", saved / 2**20)
    elif quantization == "fp8":
        from services.llm.calibration import calibration_chunks, projection_hessian_groups

        # Rounded to nearest, e4m3 costs the bundled 135M model 4% perplexity; GPTQ-rounded, 0.4-1.0%.
        saved = quantize_linears_fp8(net, projection_hessian_groups(loaded, calibration_chunks(tokenizer), device,
                                                                    dtype))
        log.info("fp8 (e4m3) weight-only quantization of the decoder projections, GPTQ-rounded on %s: %.0f MiB less",
                 "services/llm/calibration.txt", saved / 2**20)
    if pack_cpu_weights and cpu_packing_available(device, dtype):
        log.info("%d linear layers packed for oneDNN's bf16 kernels", pack_linears(net))
    check_placement(net, device, dtype)
    return loaded


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
             if misplaced(t, _stored_dtype(name, t, dtype))]
    wrong += [f"{name} ({t.device}, {t.dtype})" for name, t in net.named_buffers() if misplaced(t, torch.float32)]
    if wrong:
        raise RuntimeError(f"model tensors not placed on {device} per the dtype policy: {', '.join(wrong[:5])}")


def _stored_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a parameter must have: `dtype`, except quantized weights (int8, uint8 packed 4-bit, or fp8 e4m3)
    and the scales and minimums of GGUF blocks (fp16, or fp32 for Q4_K's expanded sub-block scales)."""
    kind = name.rpartition(".")[2]
    if kind == "qweight":
        return tensor.dtype if tensor.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn) else torch.int8
    if kind in ("block_scale", "block_min"):
        return tensor.dtype if tensor.dtype in (torch.float16, torch.float32) else torch.float16
    return dtype


def parameter_count(net: nn.Module) -> int:
    """The model's parameters as its checkpoint counts them: one per weight whatever its storage (oneDNN-packed,
    or 4-bit blocks two to a byte, whose scales are not weights), a tied LM head once, LoRA adapter slots left
    out."""
    from services.llm.layers.gguf_linear import GGUFLinear
    from services.llm.layers.packed_linear import PackedLinear

    tied_head = net.lm_head if net.config.tie_word_embeddings else None
    total, seen = 0, set()
    for module in net.modules():
        if module is tied_head:
            continue
        if isinstance(module, GGUFLinear | PackedLinear):
            total += module.in_features * module.out_features + (0 if module.bias is None else module.bias.numel())
            continue
        for name, p in module.named_parameters(recurse=False):
            if not name.startswith("lora_") and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


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
