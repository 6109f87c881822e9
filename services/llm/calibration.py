"""What the decoder projections see on a calibration text, as each projection's input Hessian (the sum of x xᵀ over
its inputs x): GPTQ rounding (`gptq.py`) needs it to keep a layer's output error small rather than its weights'.

`calibration.txt` is mixed English prose (instructions, minutes, science, dialogue, history, code, a clinical note,
finance, a recipe, a contract, an FAQ), written for this and disjoint from the perplexity bench's SQuAD paragraphs."""

from __future__ import annotations

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


def calibration_chunks(tokenizer: object, text: str | None = None, chunk_tokens: int = CHUNK_TOKENS) -> list[list[int]]:
    ids = tokenizer(text or CALIBRATION_TEXT.read_text())["input_ids"]
    return [ids[start:start + chunk_tokens] for start in range(0, len(ids) - 1, chunk_tokens)]


@torch.inference_mode()
def projection_hessians(loaded: LoadedModel, chunks: list[list[int]], device: torch.device,
                        dtype: torch.dtype) -> dict[nn.Linear, torch.Tensor]:
    """Each decoder projection's fp32 input Hessian over one prefill of each chunk, under the unquantized model."""
    hessians = {linear: torch.zeros(linear.in_features, linear.in_features, device=device)
                for _, _, linear in decoder_projections(loaded.model)}

    def accumulate(linear: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        hessians[linear].addmm_(x.T, x)

    hooks = [linear.register_forward_pre_hook(accumulate) for linear in hessians]
    try:
        for chunk in tqdm(chunks, desc="calibration prefills"):
            prompt_logits(loaded, chunk, device, dtype)
    finally:
        for hook in hooks:
            hook.remove()
    return hessians
