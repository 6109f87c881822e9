"""Under sampling, speculation leaves the output distribution unchanged: chi-square tests against the exact
distribution, first of the sampler's verification alone, then of the whole engine on a tiny model.
Seeds are fixed, so the verdict is the same on every run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from scipy.stats import chisquare

from services.llm.engine import LLMEngine, SamplingParams
from services.llm.layers.sampler import Sampler, SamplingRow
from services.llm.speculative import SpeculativeConfig

P_VALUE_FLOOR = 1e-3


def chi_square_p(counts: dict[object, int], probs: dict[object, float], total: int) -> float:
    """Cells expecting at least 5 draws stand alone, the rest are pooled (a cell expecting nothing but drawn
    fails the test outright)."""
    observed, expected, rest_observed, rest_expected = [], [], 0, 0.0
    for cell in set(counts) | set(probs):
        e = probs.get(cell, 0.0) * total
        assert e > 0 or counts.get(cell, 0) == 0, f"{cell} was drawn but has probability 0"
        if e >= 5:
            observed.append(counts.get(cell, 0))
            expected.append(e)
        else:
            rest_observed += counts.get(cell, 0)
            rest_expected += e
    if rest_expected > 0:
        observed.append(rest_observed)
        expected.append(rest_expected)
    scale = sum(observed) / sum(expected)
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


def test_verification_keeps_the_distribution_whatever_the_draft() -> None:
    torch.manual_seed(0)
    logits = torch.randn(12) * 1.5
    params = SamplingParams(temperature=0.8, top_k=8, max_tokens=4)
    probs = torch.softmax(logits / 0.8, dim=-1)
    keep = probs.topk(8).indices
    exact = {int(t): float(probs[t] / probs[keep].sum()) for t in keep}
    rows = 20000
    sampler = Sampler(torch.Generator().manual_seed(1))
    likely, unlikely = int(keep[0]), int(keep[-1])
    outside = next(t for t in range(12) if t not in exact)  # top-k removed it: it must never stand
    for draft in (likely, unlikely, outside, -1):
        out, accepted = sampler.verify(logits.repeat(rows, 1), [SamplingRow(params, [], [], None, [])] * rows,
                                       [draft] * rows)
        counts: dict[object, int] = {}
        for token in out.token_ids:
            counts[token] = counts.get(token, 0) + 1
        assert chi_square_p(counts, exact, rows) > P_VALUE_FLOOR, draft
        if draft >= 0:
            assert all(token == draft for token, a in zip(out.token_ids, accepted, strict=True) if a)
            assert sum(accepted) / rows == pytest.approx(exact.get(draft, 0.0), abs=0.02)


def test_engine_sampling_distribution_is_unchanged(tiny_models: dict[str, Path], make_engine) -> None:
    from transformers import AutoModelForCausalLM

    model_dir = tiny_models["llama"]
    prompt = [random.Random(5).randrange(4, 384) for _ in range(20)]
    temperature, top_k, samples = 0.7, 6, 3000
    params = SamplingParams(max_tokens=2, temperature=temperature, top_k=top_k)
    # The model drafting for itself proposes its own argmax: often accepted, often not, so both paths are taken.
    spec = SpeculativeConfig(method="draft", num_tokens=1, draft_model=str(model_dir))
    engine: LLMEngine = make_engine(model_dir, speculative=spec, max_num_seqs=128, max_num_batched_tokens=4096)
    outputs = engine.generate([prompt] * samples, params, use_tqdm=False)
    stats = engine.stats()
    assert 0 < stats.spec_accepted_tokens_total < stats.spec_draft_tokens_total
    counts: dict[object, int] = {}
    for output in outputs:
        pair = tuple(output.outputs[0].token_ids)
        counts[pair] = counts.get(pair, 0) + 1

    # The exact joint distribution of the two tokens, from transformers.
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def filtered(logits: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits / temperature, dim=-1)
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
        return probs / probs.sum(dim=-1, keepdim=True)

    with torch.inference_mode():
        first = filtered(hf(torch.tensor([prompt])).logits[0, -1])
        candidates = first.nonzero()[:, 0].tolist()
        batch = torch.tensor([[*prompt, t] for t in candidates])
        second = filtered(hf(batch).logits[:, -1])
    exact = {(t1, int(t2)): float(first[t1] * second[i, t2]) for i, t1 in enumerate(candidates)
             for t2 in second[i].nonzero()[:, 0]}
    assert chi_square_p(counts, exact, samples) > P_VALUE_FLOOR
