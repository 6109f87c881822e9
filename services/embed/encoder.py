"""A sentence-transformers model split in two: tokenize on the request path, embed pre-tokenized batches.

Tokenizing once per input tells the batcher each input's cost and lets truncation be decided per request;
the batch path only pads, runs the model's own modules (transformer, pooling, ...) and normalises, so in float32
the vectors equal `SentenceTransformer.encode(..., normalize_embeddings=True)`; in bf16 (`auto` on a CPU with native
bf16 matmul) all-MiniLM-L6-v2's stay within cosine 0.9999 of them.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer

from common import dense_attention_cpu
from common.cpu import native_bf16_matmul

log = logging.getLogger(__name__)

BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
_FALLBACK_MAX_TOKENS = 512
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class InputTooLong(ValueError):
    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f"input[{index}] has {tokens} tokens, more than the model's limit of {limit} "
                         f"(special tokens included); shorten it or set truncate to END or START")
        self.index, self.tokens, self.limit = index, tokens, limit


@dataclass(slots=True, frozen=True)
class Tokenized:
    """Token ids of one input (special tokens included) and whether truncation cut it."""

    ids: list[int]
    truncated: bool


def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def resolve_dtype(requested: str, device: str, cpu_bf16: bool) -> tuple[torch.dtype, str]:
    """The dtype the model runs in, and why. `auto`: fp16 on CUDA, bf16 on a CPU with native bf16 matmul
    (`cpu_bf16`: several times faster than fp32 there), else fp32."""
    if requested != "auto":
        return DTYPES[requested], "as configured"
    if device.startswith("cuda"):
        return torch.float16, "auto: CUDA"
    if device == "cpu" and cpu_bf16:
        return torch.bfloat16, "auto: the CPU has native bf16 matmul (AMX or AVX512-BF16)"
    return torch.float32, f"auto: no native bf16 matmul on {device}"


class Encoder:
    """One embedding model. `tokenize` runs on the engine's tokenizer thread, `embed` on the batcher's thread.

    `tokenize` must stay on one thread: a fast tokenizer's truncation settings are state of the object.
    """

    def __init__(self, model: SentenceTransformer, *, query_prefix: str | None = None,
                 passage_prefix: str | None = None) -> None:
        self.model = model.eval()
        self.device = model.device
        self.dtype = next(model.parameters()).dtype
        self.tokenizer = model.tokenizer
        # A second copy cuts from the left, so START (keep the end) needs no shared mutable flag.
        self._left_tokenizer = copy.deepcopy(self.tokenizer)
        self._left_tokenizer.truncation_side = "left"
        self.tokenizer.truncation_side = "right"
        self.max_tokens = model.max_seq_length or min(self.tokenizer.model_max_length, _FALLBACK_MAX_TOKENS)
        self.dimension = int(model.get_embedding_dimension())
        prompts = model.prompts or {}
        self.prefixes = {
            "query": prompts.get("query", "") if query_prefix is None else query_prefix,
            "passage": (prompts.get("passage") or prompts.get("document") or "") if passage_prefix is None
            else passage_prefix,
        }
        self._pad_id = self.tokenizer.pad_token_id or 0
        self._pad_left = self.tokenizer.padding_side == "left"
        self._token_types = "token_type_ids" in self.tokenizer.model_input_names

    @classmethod
    def load(cls, model: str, device: str = "auto", dtype: str = "auto", *, query_prefix: str | None = None,
             passage_prefix: str | None = None, cpu_attention: str = "auto") -> Encoder:
        """`cpu_attention` (auto, kernel, torch): whether a bf16 model on CPU runs its attention on the AMX
        kernel (`common/dense_attention_cpu`); `kernel` raises where it cannot, `auto` falls back with a warning."""
        start = time.perf_counter()
        device = resolve_device(device)
        torch_dtype, why = resolve_dtype(dtype, device, native_bf16_matmul())
        # A local directory must never trigger a hub lookup.
        if Path(model).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        st = SentenceTransformer(model, device=device).to(torch_dtype)
        attention = "torch"
        if device == "cpu" and torch_dtype == torch.bfloat16 and (
                dense_attention_cpu.resolve_dense_attention(cpu_attention) is not None):
            attention = f"the AMX kernel in {dense_attention_cpu.use_in(st)} model(s)"
        encoder = cls(st, query_prefix=query_prefix, passage_prefix=passage_prefix)
        log.info("loaded %s on %s in %s (%s) in %.1fs: %d dimensions, %d tokens max, prefixes %r, attention: %s",
                 model, device, str(torch_dtype).removeprefix("torch."), why, time.perf_counter() - start,
                 encoder.dimension, encoder.max_tokens, encoder.prefixes, attention)
        return encoder

    def tokenize(self, texts: Sequence[str], truncate: str = "NONE") -> list[Tokenized]:
        """Token ids per text; `truncate` NONE raises InputTooLong, END keeps the start, START keeps the end."""
        ids = self.tokenizer(list(texts), add_special_tokens=True, truncation=False, verbose=False,
                             return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        too_long = [i for i, one in enumerate(ids) if len(one) > self.max_tokens]
        if too_long and truncate == "NONE":
            raise InputTooLong(too_long[0], len(ids[too_long[0]]), self.max_tokens)
        out = [Tokenized(one, False) for one in ids]
        if too_long:
            cutter = self._left_tokenizer if truncate == "START" else self.tokenizer
            cut = cutter([texts[i] for i in too_long], add_special_tokens=True, truncation=True,
                         max_length=self.max_tokens, return_attention_mask=False,
                         return_token_type_ids=False)["input_ids"]
            for i, one in zip(too_long, cut, strict=True):
                out[i] = Tokenized(one, True)
        return out

    def embed(self, batch: Sequence[list[int]]) -> list[np.ndarray]:
        """Unit-length float32 vectors for pre-tokenized inputs, padded to the longest in the batch."""
        width = max(len(ids) for ids in batch)
        input_ids = np.full((len(batch), width), self._pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            span = slice(width - len(ids), width) if self._pad_left else slice(0, len(ids))
            input_ids[row, span] = ids
            mask[row, span] = 1
        features = {"input_ids": torch.from_numpy(input_ids).to(self.device),
                    "attention_mask": torch.from_numpy(mask).to(self.device)}
        if self._token_types:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        with torch.inference_mode():
            vectors = self.model(features)["sentence_embedding"]
            vectors = F.normalize(vectors.float(), p=2, dim=-1).cpu().numpy()
        return list(vectors)


def shorten(vector: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka truncation: the first `dimensions` values, re-normalised to unit length."""
    if dimensions is None or dimensions >= vector.shape[-1]:
        return vector
    head = vector[:dimensions]
    norm = float(np.linalg.norm(head))
    return head / norm if norm > 0 else head
