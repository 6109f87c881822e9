"""What the decoder projections see on a calibration text, as each projection's input Hessian (the sum of x xᵀ over
its inputs x): GPTQ rounding (`gptq.py`) needs it to keep a layer's output error small rather than its weights'.

`calibration.txt` is mixed English prose (instructions, minutes, science, dialogue, history, code, a clinical note,
finance, a recipe, a contract, an FAQ), written for this and disjoint from the perplexity bench's SQuAD paragraphs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from services.llm.layers.int8_linear import decoder_projections
from services.llm.perplexity import prompt_logits

if TYPE_CHECKING:
    from services.llm.loader import LoadedModel

CALIBRATION_TEXT = Path(__file__).with_name("calibration.txt")
CHUNK_TOKENS = 512  # one prefill each
# Input Hessians held at once (fp32, in_features² each). The bundled 135M model's all fit (about 400 MB: one pass
# over the calibration text); a 7B Llama's would be about 22 GB, so they come a few layers' worth per pass.
HESSIAN_BUDGET_BYTES = 1 << 30


def calibration_chunks(tokenizer: object, text: str | None = None, chunk_tokens: int = CHUNK_TOKENS) -> list[list[int]]:
    ids = tokenizer(text or CALIBRATION_TEXT.read_text())["input_ids"]
    return [ids[start:start + chunk_tokens] for start in range(0, len(ids) - 1, chunk_tokens)]


def projection_hessian_groups(loaded: LoadedModel, chunks: list[list[int]], device: torch.device, dtype: torch.dtype,
                              budget_bytes: int | None = None) -> Iterator[dict[nn.Linear, torch.Tensor]]:
    """The decoder projections' input Hessians (as `projection_hessians`), a group at a time: as many projections,
    in model order, as fit `budget_bytes` (default `HESSIAN_BUDGET_BYTES`; at least one), each group from its own
    pass of the calibration prefills. The model must stay unquantized until the last group is out (the caller
    swaps its projections afterwards), so every group sees the inputs the unquantized model gives."""
    budget = HESSIAN_BUDGET_BYTES if budget_bytes is None else budget_bytes
    groups: list[list[nn.Linear]] = [[]]
    held = 0
    for _, _, linear in decoder_projections(loaded.model):
        size = linear.in_features ** 2 * 4
        if groups[-1] and held + size > budget:
            groups.append([])
            held = 0
        groups[-1].append(linear)
        held += size
    for index, group in enumerate(groups):
        pass_name = f"calibration prefills ({index + 1}/{len(groups)})" if len(groups) > 1 else None
        yield projection_hessians(loaded, chunks, device, dtype, group, pass_name)


@torch.inference_mode()
def projection_hessians(loaded: LoadedModel, chunks: list[list[int]], device: torch.device, dtype: torch.dtype,
                        linears: list[nn.Linear] | None = None,
                        progress: str | None = None) -> dict[nn.Linear, torch.Tensor]:
    """The fp32 input Hessian of each decoder projection (or of `linears` only) over one prefill of each chunk,
    under the model as it is."""
    if linears is None:
        linears = [linear for _, _, linear in decoder_projections(loaded.model)]
    hessians = {linear: torch.zeros(linear.in_features, linear.in_features, device=device) for linear in linears}

    def accumulate(linear: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        hessians[linear].addmm_(x.T, x)

    hooks = [linear.register_forward_pre_hook(accumulate) for linear in hessians]
    try:
        for chunk in tqdm(chunks, desc=progress or "calibration prefills"):
            prompt_logits(loaded, chunk, device, dtype)
    finally:
        for hook in hooks:
            hook.remove()
    return hessians
