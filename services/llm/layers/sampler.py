"""Turns a batch of last-position logits into next tokens, vectorized over the batch.

Order: logit_bias, penalties and min_tokens act on the logits, then a grammar mask (guided decoding) sets the
tokens its grammar forbids to -inf, last, so nothing brings them back; greedy rows take the argmax; the other
rows are scaled by temperature, filtered by top-k / top-p / min-p, and sampled by inverting their CDF with one
uniform draw each, which comes from the row's own generator when the request is seeded so that a seed gives the
same text whatever else shares the batch. Logprobs are the model's own (raw logits).

One draw a row rather than a vocabulary of noise (the exponential race, argmax of p / E with E ~ Exp(1)):
torch's CPU `exponential_` fills about 30 M numbers a second, so the race took 50-60 ms a step for 32 rows of
a 49k vocabulary, as long as the model's own decode step; the CDF (`sample_rows`) is one pass over the
probabilities. A batch of only sampled rows also skips the argmax and the row copies: the whole sampling of
32 rows at temperature 1 (the OpenAI default) went from 60 to 2 ms on a 2-core Xeon.

`verify` is the same pipeline for speculative decoding: each row may carry a draft token, proposed
deterministically (prompt lookup, or a draft model's argmax). A draft is accepted with the probability the
target gives it (greedy: when it is the argmax); a rejected row samples from the target with the draft token
removed. For a deterministic proposal this is exactly the rejection sampling of Leviathan et al. (2023): the
tokens come from the target's distribution whatever the drafts were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from services.llm.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    banned_token_ids: list[int]  # EOS and stop tokens while min_tokens is not yet reached


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]  # per row: (sampled logprob, top-k), or None


class LogitsMask(Protocol):
    """Forbids tokens per row in place (sets them to -inf); guided decoding's grammar masks are one."""

    def apply(self, logits: torch.Tensor) -> None: ...


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # noise for unseeded rows

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow], mask: LogitsMask | None = None
                 ) -> SamplerOutput:
        logits = logits.float()
        params = [row.params for row in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        logits = _constrain(logits, rows, mask)
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows and len(sampled_rows) == len(rows):  # no greedy row: no argmax, no copy of the rows
            tokens = self._sample(logits, params, [r.generator for r in rows])
        else:
            tokens = row_argmax(logits)
            if sampled_rows:
                index = torch.tensor(sampled_rows, device=logits.device)
                tokens[index] = self._sample(logits[index], [params[i] for i in sampled_rows],
                                             [rows[i].generator for i in sampled_rows])
        token_list = tokens.tolist()
        return SamplerOutput(token_ids=token_list, logprobs=_gather_logprobs(raw_logprobs, token_list, params))

    def verify(self, logits: torch.Tensor, rows: list[SamplingRow], drafts: list[int],
               mask: LogitsMask | None = None) -> tuple[SamplerOutput, list[bool]]:
        """Per row: the draft token (-1: none) is accepted or not, and the token the row emits: the draft when
        accepted, else a sample from the target without the draft (rows with no draft sample as usual)."""
        logits = logits.float()
        params = [row.params for row in rows]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(p.logprobs is not None for p in params) else None
        logits = _constrain(logits, rows, mask)
        draft = torch.tensor(drafts, device=logits.device)
        tokens = row_argmax(logits)
        accepted = tokens == draft
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sampled_rows:
            index = torch.tensor(sampled_rows, device=logits.device)
            probs = _probs(logits[index], [params[i] for i in sampled_rows])
            sub_draft = draft[index]
            has_draft = sub_draft >= 0
            safe_draft = sub_draft.clamp(min=0)[:, None]
            draft_prob = probs.gather(1, safe_draft)[:, 0] / probs.sum(dim=-1)
            generators = [rows[i].generator for i in sampled_rows]
            accepted[index] = has_draft & (self._uniform(generators, probs.device) < draft_prob)
            residual = probs.scatter(1, safe_draft, torch.where(has_draft[:, None], 0.0, probs.gather(1, safe_draft)))
            tokens[index] = sample_rows(residual, self._uniform(generators, probs.device))
        tokens = torch.where(accepted, draft, tokens)
        token_list = tokens.tolist()
        return (SamplerOutput(token_ids=token_list, logprobs=_gather_logprobs(raw_logprobs, token_list, params)),
                accepted.tolist())

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        return sample_rows(_probs(logits, params), self._uniform(generators, logits.device))

    def _uniform(self, generators: list[torch.Generator | None], device: torch.device) -> torch.Tensor:
        draws = torch.rand(len(generators), generator=self.generator, device=device)
        for i, g in enumerate(generators):
            if g is not None:
                draws[i] = torch.rand(1, generator=g, device=device)[0]
        return draws


# The CDF is searched in blocks of this many tokens: block totals first, then the chosen block's running sum.
CDF_BLOCK = 256


def sample_rows(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Per row of `probs` `[R, V]` (non-negative, any positive total), the first token whose running total passes
    `uniforms[r]` (in [0, 1)) times the row's total: a draw from the row's distribution, never a zero-probability
    token. One pass over `probs` (the block totals, summed in fp32 over 256 tokens); the running sums are fp64."""
    rows, vocab = probs.shape
    padding = -vocab % CDF_BLOCK
    blocks = (F.pad(probs, (0, padding)) if padding else probs).reshape(rows, -1, CDF_BLOCK)
    totals = blocks.sum(dim=-1).double()  # [R, V / CDF_BLOCK]
    ends = totals.cumsum(dim=-1)
    targets = uniforms.double() * ends[:, -1]
    # The first block whose end passes the target has mass; rounding can only push past the last one.
    block = torch.minimum(torch.searchsorted(ends, targets[:, None], right=True)[:, 0], _last_positive(totals))
    inside = blocks[torch.arange(rows, device=probs.device), block].double()  # [R, CDF_BLOCK]
    rest = targets - (ends - totals).gather(1, block[:, None])[:, 0]
    offset = torch.minimum(torch.searchsorted(inside.cumsum(dim=-1), rest[:, None], right=True)[:, 0],
                           _last_positive(inside))
    return block * CDF_BLOCK + offset


def _last_positive(x: torch.Tensor) -> torch.Tensor:
    """Each row's last index holding a positive value."""
    return x.shape[-1] - 1 - (x > 0).flip(-1).to(torch.uint8).argmax(dim=-1)


def row_argmax(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first on ties, like `argmax`): `max(dim=-1)`'s indices, which on CPU come 3x faster
    than `argmax` over a vocabulary (0.8 vs 2.7 ms for 32 rows of 49k, one thread)."""
    return x.max(dim=-1).indices


def _constrain(logits: torch.Tensor, rows: list[SamplingRow], mask: LogitsMask | None) -> torch.Tensor:
    """logit_bias, penalties, banned tokens, then the grammar mask: the logit edits before greedy or sampling."""
    if any(row.params.logit_bias for row in rows):
        logits = apply_logit_bias(logits, [row.params for row in rows])
    if any(row.params.uses_penalties for row in rows):
        logits = apply_penalties(logits, rows)
    banned = [(i, token) for i, row in enumerate(rows) for token in row.banned_token_ids]
    if banned:
        row_index, token_index = zip(*banned, strict=True)
        logits = logits.index_put((torch.tensor(row_index, device=logits.device),
                                   torch.tensor(token_index, device=logits.device)),
                                  torch.tensor(float("-inf"), device=logits.device))
    if mask is not None:
        logits = logits.contiguous()
        mask.apply(logits)
    return logits


def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k / top-p / min-p: the (unnormalized) distribution a sampled row draws from."""
    if any(p.temperature != 1.0 for p in params):
        logits = logits / torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
    return filter_probs(torch.softmax(logits, dim=-1), params)


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Adds each row's `logit_bias` to its tokens' logits (ids past the logits' width are ignored)."""
    vocab = logits.shape[1]
    entries = [(i, token, bias) for i, p in enumerate(params) for token, bias in (p.logit_bias or {}).items()
               if token < vocab]
    if not entries:
        return logits
    rows, tokens, biases = zip(*entries, strict=True)
    device = logits.device
    return logits.index_put((torch.tensor(rows, device=device), torch.tensor(tokens, device=device)),
                            torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition penalty over prompt and output tokens (CTRL style); presence/frequency over output tokens."""
    batch, vocab = logits.shape
    device = logits.device
    counts = torch.zeros((batch, vocab), device=device)
    seen = torch.zeros((batch, vocab), dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        if not row.params.uses_penalties:
            continue
        if row.output_token_ids:
            out = torch.tensor(row.output_token_ids, device=device)
            counts[i].scatter_add_(0, out, torch.ones_like(out, dtype=counts.dtype))
        if row.params.repetition_penalty != 1.0:
            seen[i, row.prompt_token_ids] = True
    seen |= counts > 0
    repetition = torch.tensor([r.params.repetition_penalty for r in rows], device=device)[:, None]
    frequency = torch.tensor([r.params.frequency_penalty for r in rows], device=device)[:, None]
    presence = torch.tensor([r.params.presence_penalty for r in rows], device=device)[:, None]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency * counts - presence * (counts > 0).float()


def filter_probs(probs: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Zeroes tokens outside top-k, the top-p nucleus, or below min_p × the top probability."""
    device = probs.device
    vocab = probs.shape[1]
    min_p = torch.tensor([p.min_p for p in params], device=device)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if bool((top_k < vocab).any()) or bool((top_p < 1.0).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=device)[None, :]
        drop = rank >= top_k[:, None]
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        # Nucleus over what top-k left, renormalized; a token stays if the mass before it is below top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        total = sorted_probs.sum(dim=-1, keepdim=True)
        drop |= mass_before > top_p[:, None] * total
        drop[:, 0] = False
        probs = torch.zeros_like(probs).scatter_(1, order, sorted_probs.masked_fill(drop, 0.0))
    return probs


def _gather_logprobs(raw: torch.Tensor | None, tokens: list[int], params: list[SamplingParams]
                     ) -> list[tuple[float, list[tuple[int, float]]] | None]:
    if raw is None:
        return [None] * len(tokens)
    k = max(p.logprobs or 0 for p in params)
    chosen = raw[torch.arange(len(tokens), device=raw.device), torch.tensor(tokens, device=raw.device)].tolist()
    top_values, top_ids = (raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long()))
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    result: list[tuple[float, list[tuple[int, float]]] | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            result.append(None)
        else:
            result.append((chosen[i], list(zip(top_ids[i][:p.logprobs], top_values[i][:p.logprobs], strict=True))))
    return result
