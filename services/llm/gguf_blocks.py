"""Keeps a GGUF file's quantized decoder projections in their block format (the loader's native GGUF path).

The loader first loads every tensor dequantized (transformers' reader, as for any GGUF); this swaps each
decoder projection whose GGUF tensors are Q8_0, Q4_0, Q4_1 or Q4_K for a `GGUFLinear` over the file's blocks,
read with the `gguf` package. Fused projections (q/k/v, gate/up) take their parts' rows one after the other,
so all parts must share a format; otherwise the projection stays dequantized, as do the embeddings, the LM head
and every other format (Q5_*, Q6_K, ...). Rows move whole, so llama.cpp's Q/K row permutation is undone
on the blocks by the reader's own permutation applied to row indices. Every swapped projection is checked
against the dequantized weights it replaces: they must be equal, bit for bit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.llm.kernels.gguf_matmul import FORMATS, unpack_rows
from services.llm.layers.gguf_linear import GGUFLinear

log = logging.getLogger(__name__)

# Our fused projection -> (its owner in a decoder layer, the GGUF tensor names of its parts, in order).
PROJECTIONS = {"qkv_proj": ("self_attn", ("attn_q", "attn_k", "attn_v")), "o_proj": ("self_attn", ("attn_output",)),
               "gate_up_proj": ("mlp", ("ffn_gate", "ffn_up")), "down_proj": ("mlp", ("ffn_down",))}


def keep_gguf_blocks(net: nn.Module, path: Path, hf_config: dict) -> Counter[str]:
    """Swaps `net`'s decoder projections (already loaded dequantized) for block-format layers where the file
    allows; returns the number of projections swapped per format."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    unpermute = _row_permutation(reader, hf_config)
    swapped: Counter[str] = Counter()
    for index, layer in enumerate(net.model.layers):
        for name, (owner_name, parts) in PROJECTIONS.items():
            found = [tensors.get(f"blk.{index}.{part}.weight") for part in parts]
            formats = {t.tensor_type.name for t in found if t is not None}
            if None in found or len(formats) != 1 or (fmt := formats.pop()) not in FORMATS:
                continue
            owner = getattr(layer, owner_name)
            dense = getattr(owner, name)
            assert isinstance(dense, nn.Linear), f"layer {index} {name} is {type(dense).__name__}, not nn.Linear"
            blocks = [unpack_rows(fmt, np.asarray(t.data)) for t in found]
            blocks = [_permute_rows(b, unpermute(t.name, b[1].shape[0])) for b, t in zip(blocks, found, strict=True)]
            q, scale, minimum = (None if b[0] is None else torch.cat(b) for b in zip(*blocks, strict=True))
            device, dtype = dense.weight.device, dense.weight.dtype
            bias = None if dense.bias is None else dense.bias.data
            native = GGUFLinear(fmt, q.to(device), scale.to(device), None if minimum is None else minimum.to(device),
                                bias, dtype)
            if device.type != "meta" and not torch.equal(native.dequantized_weight(), dense.weight.data):
                raise RuntimeError(f"{path.name}: blk.{index} {'/'.join(parts)} in block format do not dequantize "
                                   "to the weights the reader loaded")
            setattr(owner, name, native)
            swapped[fmt] += 1
    log.info("%s: decoder projections kept in GGUF block format: %s", path.name, dict(swapped) or "none")
    return swapped


def _row_permutation(reader: object, hf_config: dict) -> Callable[[str, int], np.ndarray]:
    """`unpermute(tensor_name, rows)`: the row order transformers' reader gives that tensor, as indices into the
    file's rows (identity for architectures it does not permute)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_config)

    def unpermute(name: str, rows: int) -> np.ndarray:
        index = np.arange(rows).reshape(rows, 1)
        return np.asarray(processor.process(weights=index, name=name).weights).reshape(rows)

    return unpermute


def _permute_rows(blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                  order: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if np.array_equal(order, np.arange(len(order))):
        return blocks
    rows = torch.from_numpy(order)
    return tuple(None if t is None else t[rows] for t in blocks)  # type: ignore[return-value]
