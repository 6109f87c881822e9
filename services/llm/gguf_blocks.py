"""Keeps a GGUF file's quantized decoder projections in their block format (the loader's native GGUF path).

Before the weights are loaded, each decoder projection whose GGUF tensors are Q8_0, Q4_0, Q4_1, Q4_K or Q6_K is
swapped for a `GGUFLinear` over the file's own blocks, read with the `gguf` package; the loader then dequantizes
only the other tensors. Fused projections (q/k/v, gate/up) take their parts' rows one after the other where
the parts share a format, and run one matrix per run of same-format parts where they do not (`GGUFConcatLinear`);
a projection with any part in another format is loaded dequantized, as are the embeddings, the LM head and
every other format (Q5_*, Q2_K, Q3_K, ...). Rows move whole, so llama.cpp's Q/K row permutation is undone on the
blocks by the reader's own permutation applied to row indices. The first layer's swapped projections are
checked against what the reader would have loaded in their place: equal, bit for bit, in the model's dtype.
"""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from services.llm.gguf_file import gguf_index
from services.llm.kernels.gguf_matmul import FORMATS, unpack_rows
from services.llm.layers.gguf_linear import GGUFConcatLinear, GGUFLinear

log = logging.getLogger(__name__)

# Our fused projection -> (its owner in a decoder layer, the GGUF tensor names of its parts, in order).
PROJECTIONS = {"qkv_proj": ("self_attn", ("attn_q", "attn_k", "attn_v")), "o_proj": ("self_attn", ("attn_output",)),
               "gate_up_proj": ("mlp", ("ffn_gate", "ffn_up")), "down_proj": ("mlp", ("ffn_down",))}


def keep_gguf_blocks(net: nn.Module, path: Path) -> set[str]:
    """Swaps `net`'s decoder projections (built, not loaded yet) for block-format layers where the file allows;
    returns the GGUF tensor names they hold, which the loader leaves out."""
    index = gguf_index(path)
    tensors = {t.name: t for t in index.file_tensors()}
    processor = index.processor()
    swapped: Counter[str] = Counter()
    kept: set[str] = set()
    for index, layer in enumerate(net.model.layers):
        for name, (owner_name, parts) in PROJECTIONS.items():
            found = [tensors.get(f"blk.{index}.{part}.weight") for part in parts]
            if None in found or any(t.tensor_type.name not in FORMATS for t in found):
                continue
            owner = getattr(layer, owner_name)
            dense = getattr(owner, name)
            assert isinstance(dense, nn.Linear), f"layer {index} {name} is {type(dense).__name__}, not nn.Linear"
            device, dtype = dense.weight.device, dense.weight.dtype
            bias = None if dense.bias is None else dense.bias.data  # loaded with the other tensors
            runs = [list(run) for _, run in itertools.groupby(found, key=lambda t: t.tensor_type.name)]
            if len(runs) == 1:
                native = _block_matrix(runs[0], processor, device, dtype, bias)
                matrices = [native]
            else:
                matrices = [_block_matrix(run, processor, device, dtype, None) for run in runs]
                native = GGUFConcatLinear(matrices, bias, dtype)
            if index == 0 and device.type != "meta":
                _check_against_reader(native, found, processor, path)
            setattr(owner, name, native)
            swapped.update(m.fmt for m in matrices)
            kept.update(t.name for t in found)
    log.info("%s: decoder projections kept in GGUF block format: %s", path.name, dict(swapped) or "none")
    return kept


def _block_matrix(tensors: list, processor: object, device: torch.device, dtype: torch.dtype,
                  bias: torch.Tensor | None) -> GGUFLinear:
    """One block-format matrix of same-format GGUF tensors, their rows one after the other."""
    fmt = tensors[0].tensor_type.name
    blocks = [_permute_rows(unpack_rows(fmt, np.asarray(t.data)), _row_order(processor, t.name, t.data.shape[0]))
              for t in tensors]
    q, scale, minimum = (None if b[0] is None else torch.cat(b).to(device) for b in zip(*blocks, strict=True))
    return GGUFLinear(fmt, q, scale, minimum, bias, dtype)


def _check_against_reader(native: GGUFLinear | GGUFConcatLinear, found: list, processor: object,
                          path: Path) -> None:
    from gguf import dequantize

    want = torch.cat([torch.from_numpy(np.asarray(processor.process(weights=dequantize(t.data, t.tensor_type),
                                                                    name=t.name).weights)) for t in found])
    if not torch.equal(native.dequantized_weight().cpu(), want.to(native.dtype)):
        raise RuntimeError(f"{path.name}: {'/'.join(t.name for t in found)} in block format do not dequantize to "
                           "the weights the GGUF reader gives")


def _row_order(processor: object, name: str, rows: int) -> np.ndarray:
    """The row order the reader gives tensor `name`, as indices into the file's rows (the identity where the
    architecture's processor permutes nothing)."""
    index = np.arange(rows).reshape(rows, 1)
    return np.asarray(processor.process(weights=index, name=name).weights).reshape(rows)


def _permute_rows(blocks: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                  order: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if np.array_equal(order, np.arange(len(order))):
        return blocks
    rows = torch.from_numpy(order)
    return tuple(None if t is None else t[rows] for t in blocks)  # type: ignore[return-value]
