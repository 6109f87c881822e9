"""Scorers: turn (query, passage) pairs into token ids on the request path, and batches of them into scores
on the batcher's worker thread.

- `CrossEncoderScorer`: an HF sequence-classification model; its logit is the score.
- `DecoderScorer`: a causal LM (HF directory or `.gguf`), forward passes only, in one of two modes:
  `yes_no` (log-odds of "yes" vs "no" after a relevance question) or `query_likelihood` (mean log-probability
  of the query's tokens given the passage). Only the positions that are scored go through the LM head.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from common.errors import APIError

log = logging.getLogger(__name__)

DecoderMode = Literal["yes_no", "query_likelihood"]
DEFAULT_DECODER_MAX_LENGTH = 512
_PASSAGE_SLOT = "\x00PASSAGE\x00"
QUERY_LIKELIHOOD_PROMPT = ("Passage:" + _PASSAGE_SLOT +
                           "\nPlease write a question or claim based on this passage.\nQuery:")
YES_NO_QUESTION = ("Query: {query}\nPassage:" + _PASSAGE_SLOT +
                   "\nDoes the passage answer or support the query? Answer yes or no.")
_YES = ("yes", "Yes", " yes", " Yes")
_NO = ("no", "No", " no", " No")


class PairTooLong(APIError):
    def __init__(self, index: int, length: int, limit: int) -> None:
        super().__init__(400, f"query + passage {index} is {length} tokens, over the limit of {limit}; "
                              f"send truncate: END to cut the passage", param="passages", code="too_long")


class QueryTooLong(APIError):
    def __init__(self, length: int, limit: int) -> None:
        super().__init__(400, f"the query and prompt take {length} tokens, leaving no room for a passage "
                              f"within the limit of {limit}", param="query", code="too_long")


@dataclass(slots=True)
class EncodedPair:
    """One (query, passage) pair as token ids, ready for a batch."""

    input_ids: list[int]
    token_type_ids: list[int] | None = None
    query_tokens: int = 0  # query_likelihood: the trailing tokens whose log-probability is the score

    @property
    def cost(self) -> int:
        return len(self.input_ids)


class Scorer(ABC):
    kind: str
    max_length: int
    device: torch.device

    @abstractmethod
    def encode(self, query: str, passages: list[str], truncate: bool) -> list[EncodedPair]:
        """Token ids for each pair; raises PairTooLong (truncate off) or QueryTooLong."""

    @abstractmethod
    def score(self, pairs: list[EncodedPair]) -> list[float]:
        """One raw score (logit) per pair, higher is more relevant; runs on the worker thread."""

    @abstractmethod
    def relevance(self, logit: float) -> float:
        """The score as a value in [0, 1], for Cohere-style `relevance_score`."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _pad_right(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class CrossEncoderScorer(Scorer):
    """Any HF sequence-classification model: 1 label → its logit; 2 labels → positive minus negative logit."""

    kind = "cross_encoder"

    def __init__(self, path: str, device: torch.device, max_length: int = 0) -> None:
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=_dtype_for(device))
        self.model.to(device).eval()
        labels = self.model.config.num_labels
        if labels not in (1, 2):
            raise ValueError(f"{path}: a cross-encoder needs 1 or 2 labels, this model has {labels}")
        self.max_length = min(max_length or self._model_limit(), self._model_limit())

    def _model_limit(self) -> int:
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", 512)
        if "roberta" in config.model_type or config.model_type == "camembert":
            limit -= 2  # RoBERTa positions start after the padding index
        tokenizer_limit = self.tokenizer.model_max_length
        return min(limit, tokenizer_limit) if tokenizer_limit < 1_000_000 else limit

    def encode(self, query: str, passages: list[str], truncate: bool) -> list[EncodedPair]:
        query_length = len(self.tokenizer(query, add_special_tokens=False)["input_ids"])
        fixed = query_length + self.tokenizer.num_special_tokens_to_add(pair=True)
        if fixed >= self.max_length:
            raise QueryTooLong(fixed, self.max_length)
        encoded = self.tokenizer([query] * len(passages), passages, truncation="only_second" if truncate else False,
                                 max_length=self.max_length if truncate else None)
        pairs = []
        for index, ids in enumerate(encoded["input_ids"]):
            if len(ids) > self.max_length:
                raise PairTooLong(index, len(ids), self.max_length)
            types = encoded["token_type_ids"][index] if "token_type_ids" in encoded else None
            pairs.append(EncodedPair(ids, types))
        return pairs

    def score(self, pairs: list[EncodedPair]) -> list[float]:
        features = [{"input_ids": p.input_ids} | ({"token_type_ids": p.token_type_ids} if p.token_type_ids else {})
                    for p in pairs]
        batch = self.tokenizer.pad(features, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            logits = self.model(**batch).logits.float()
        scores = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
        return scores.cpu().tolist()

    def relevance(self, logit: float) -> float:
        return _sigmoid(logit)


def load_causal_lm(path: str, device: torch.device) -> tuple[PreTrainedTokenizerBase, torch.nn.Module]:
    """A causal LM from an HF directory, or a `.gguf` file dequantized by transformers."""
    file = Path(path)
    source = {"pretrained_model_name_or_path": str(file.parent), "gguf_file": file.name} \
        if file.suffix == ".gguf" else {"pretrained_model_name_or_path": path}
    tokenizer = AutoTokenizer.from_pretrained(**source)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=_dtype_for(device))
    return tokenizer, model.to(device).eval()


class DecoderScorer(Scorer):
    """LLM relevance scores from one batched forward pass: no generation, no vocab logits for unscored positions.

    A pair is `lead + head + passage + tail (+ query)`: the prompt is split around the passage so that
    `truncate: END` cuts only the passage. Batches are right-padded, so each row's positions are 0..len-1.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module, mode: DecoderMode,
                 max_length: int = 0) -> None:
        self.kind, self.mode = mode, mode
        self.tokenizer, self.model = tokenizer, model
        self.device = next(model.parameters()).device
        self.body = self.model.base_model
        self.head = self.model.get_output_embeddings()
        positions = getattr(self.model.config, "max_position_embeddings", DEFAULT_DECODER_MAX_LENGTH)
        self.max_length = min(max_length or DEFAULT_DECODER_MAX_LENGTH, positions)
        self.pad_id = next(i for i in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if i is not None)
        self._lead = self._leading_special_tokens()
        self.yes_ids = self._single_token_ids(_YES)
        self.no_ids = self._single_token_ids(_NO)
        if mode == "yes_no" and (not self.yes_ids or not self.no_ids):
            raise ValueError("no single-token 'yes'/'no' in the vocabulary; use query_likelihood")

    @classmethod
    def load(cls, path: str, mode: DecoderMode, device: torch.device, max_length: int = 0) -> DecoderScorer:
        tokenizer, model = load_causal_lm(path, device)
        return cls(tokenizer, model, mode, max_length)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _leading_special_tokens(self) -> list[int]:
        """The tokens the tokenizer puts before any text (a BOS), which a causal LM expects first."""
        plain, full = self._ids("x"), self.tokenizer("x")["input_ids"]
        start = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
        return full[:start]

    def _single_token_ids(self, variants: tuple[str, ...]) -> list[int]:
        return sorted({ids[0] for ids in map(self._ids, variants) if len(ids) == 1})

    def _prompt(self, query: str) -> tuple[str, str]:
        """The prompt text before and after the passage slot."""
        if self.mode == "query_likelihood":
            head, _, tail = QUERY_LIKELIHOOD_PROMPT.partition(_PASSAGE_SLOT)
            return head, tail
        question = YES_NO_QUESTION.format(query=query)
        if self.tokenizer.chat_template:
            question = self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                          add_generation_prompt=True)
        else:
            question += "\nAnswer:"
        head, _, tail = question.rpartition(_PASSAGE_SLOT)  # the last slot: a query could contain the marker
        return head, tail

    def encode(self, query: str, passages: list[str], truncate: bool) -> list[EncodedPair]:
        head, tail = self._prompt(query)
        query_ids = self._ids(" " + query) if self.mode == "query_likelihood" else []
        fixed = [*self._lead, *self._ids(head)], [*self._ids(tail), *query_ids]
        room = self.max_length - len(fixed[0]) - len(fixed[1])
        if room <= 0:
            raise QueryTooLong(len(fixed[0]) + len(fixed[1]), self.max_length)
        passage_ids = self.tokenizer([" " + p for p in passages], add_special_tokens=False)["input_ids"]
        pairs = []
        for index, ids in enumerate(passage_ids):
            if len(ids) > room and not truncate:
                raise PairTooLong(index, len(ids) + self.max_length - room, self.max_length)
            pairs.append(EncodedPair([*fixed[0], *ids[:room], *fixed[1]], query_tokens=len(query_ids)))
        return pairs

    def score(self, pairs: list[EncodedPair]) -> list[float]:
        ids, mask = _pad_right([p.input_ids for p in pairs], self.pad_id, self.device)
        lengths = [p.cost for p in pairs]
        with torch.inference_mode():
            hidden = self.body(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            if self.mode == "yes_no":
                return self._yes_no(hidden, lengths)
            return self._query_likelihood(hidden, ids, pairs)

    def _yes_no(self, hidden: torch.Tensor, lengths: list[int]) -> list[float]:
        last = hidden[torch.arange(len(lengths), device=hidden.device), torch.tensor(lengths, device=hidden.device) - 1]
        logits = self.head(last).float()
        odds = torch.logsumexp(logits[:, self.yes_ids], dim=-1) - torch.logsumexp(logits[:, self.no_ids], dim=-1)
        return odds.cpu().tolist()

    def _query_likelihood(self, hidden: torch.Tensor, ids: torch.Tensor, pairs: list[EncodedPair]) -> list[float]:
        rows, targets = [], []
        for row, pair in enumerate(pairs):
            assert pair.query_tokens > 0, "query_likelihood pairs end with the query's tokens"
            start = pair.cost - pair.query_tokens
            rows += [row] * pair.query_tokens
            targets += range(start, pair.cost)
        rows_t = torch.tensor(rows, device=hidden.device)
        targets_t = torch.tensor(targets, device=hidden.device)
        # position t - 1 predicts token t: only these hidden states meet the LM head
        logits = self.head(hidden[rows_t, targets_t - 1]).float()
        token_logp = torch.log_softmax(logits, dim=-1).gather(1, ids[rows_t, targets_t][:, None])[:, 0]
        sums = torch.zeros(len(pairs), device=hidden.device).index_add_(0, rows_t, token_logp)
        counts = torch.tensor([p.query_tokens for p in pairs], device=hidden.device, dtype=torch.float32)
        return (sums / counts).cpu().tolist()

    def relevance(self, logit: float) -> float:
        # yes_no: P(yes | yes or no); query_likelihood: geometric-mean probability of the query's tokens
        return _sigmoid(logit) if self.mode == "yes_no" else math.exp(logit)


def detect_scorer_kind(path: str) -> str:
    """auto: a sequence-classification config → cross_encoder; a causal LM or `.gguf` → query_likelihood."""
    if path.endswith(".gguf"):
        return "query_likelihood"
    architectures = AutoConfig.from_pretrained(path).architectures or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "cross_encoder"
    if any(name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for name in architectures):
        return "query_likelihood"
    raise ValueError(f"{path}: cannot tell the scorer from architectures {architectures}; set RERANK_SCORER")


def load_scorer(path: str, kind: str, device: torch.device, max_length: int = 0) -> Scorer:
    kind = detect_scorer_kind(path) if kind == "auto" else kind
    log.info("loading %s scorer from %s on %s", kind, path, device)
    if kind == "cross_encoder":
        return CrossEncoderScorer(path, device, max_length)
    if kind in ("yes_no", "query_likelihood"):
        return DecoderScorer.load(path, kind, device, max_length)  # type: ignore[arg-type]
    raise ValueError(f"unknown scorer {kind!r}")
