"""The sampler's filters never let an excluded token through, and seeds reproduce."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.llm.engine import SamplingParams
from services.llm.layers.sampler import CDF_BLOCK, Sampler, SamplingRow, apply_penalties, filter_probs, sample_rows

VOCAB = 50


def row(params: SamplingParams, generator: torch.Generator | None = None, output: list[int] | None = None,
        prompt: list[int] | None = None, banned: list[int] | None = None) -> SamplingRow:
    return SamplingRow(params=params, prompt_token_ids=prompt or [], output_token_ids=output or [],
                       generator=generator, banned_token_ids=banned or [])


def seeded(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


filters = st.fixed_dictionaries({
    "top_k": st.sampled_from([-1, 1, 2, 5, 20]),
    "top_p": st.sampled_from([1.0, 0.9, 0.5, 0.1]),
    "min_p": st.sampled_from([0.0, 0.05, 0.3, 0.9]),
    "temperature": st.sampled_from([0.3, 1.0, 2.0]),
})


def allowed_tokens(logits: torch.Tensor, params: SamplingParams) -> set[int]:
    """The tokens a filter may keep, computed the slow, obvious way."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    order = sorted(range(VOCAB), key=lambda t: -probs[t].item())
    keep = order[:params.top_k] if params.top_k > 0 else order
    if params.min_p > 0:
        keep = [t for t in keep if probs[t] >= params.min_p * probs[order[0]]]
    kept_mass = sum(probs[t].item() for t in keep)
    nucleus, mass = [], 0.0
    for t in keep:
        nucleus.append(t)
        mass += probs[t].item()
        if mass >= params.top_p * kept_mass - 1e-6:
            break
    return set(nucleus)


@settings(max_examples=60, deadline=None)
@given(options=st.lists(filters, min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_filters_never_emit_excluded_tokens(options: list[dict], seed: int) -> None:
    logits = torch.randn((len(options), VOCAB), generator=seeded(seed)) * 3
    params = [SamplingParams(**o) for o in options]
    sampler = Sampler(seeded(seed))
    for _ in range(5):
        out = sampler(logits, [row(p) for p in params])
        for i, (token, p) in enumerate(zip(out.token_ids, params, strict=True)):
            assert token in allowed_tokens(logits[i], p)


@settings(max_examples=30, deadline=None)
@given(options=st.lists(filters, min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_filtered_probabilities_keep_the_top_token(options: list[dict], seed: int) -> None:
    logits = torch.randn((len(options), VOCAB), generator=seeded(seed)) * 3
    params = [SamplingParams(**o) for o in options]
    probs = filter_probs(torch.softmax(logits, dim=-1), params)
    assert bool((probs.argmax(dim=-1) == logits.argmax(dim=-1)).all())
    assert bool((probs.sum(dim=-1) > 0).all())


def test_greedy_takes_the_argmax() -> None:
    logits = torch.randn((3, VOCAB), generator=seeded(0))
    out = Sampler(seeded(0))(logits, [row(SamplingParams(temperature=0.0))] * 3)
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_same_seed_same_tokens_whatever_shares_the_batch() -> None:
    logits = torch.randn((3, VOCAB), generator=seeded(1))
    params = SamplingParams(temperature=1.0, seed=42)
    alone, in_batch = seeded(42), seeded(42)
    for _ in range(20):
        token_alone = Sampler(seeded(0))(logits[:1], [row(params, alone)]).token_ids[0]
        batch = [row(params, in_batch), row(SamplingParams()), row(SamplingParams(top_k=3))]
        assert Sampler(seeded(99))(logits, batch).token_ids[0] == token_alone
    stream = seeded(7)
    draws = [Sampler(seeded(1))(logits[:1], [row(params, stream)]).token_ids[0] for _ in range(20)]
    assert len(set(draws)) > 1  # the seed fixes the stream; it does not make sampling greedy


def test_banned_tokens_are_never_sampled() -> None:
    logits = torch.zeros((1, VOCAB))
    logits[0, 2] = 100.0
    out = Sampler(seeded(0))(logits, [row(SamplingParams(temperature=0.0), banned=[2])])
    assert out.token_ids[0] != 2


def test_penalties_follow_their_definitions() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, [row(params, output=[0, 0, 1], prompt=[2])])
    # token 0: 2/2 - 0.5*2 - 0.25; token 1: -2*2 - 0.5 - 0.25; token 2 (prompt only): 1/2; token 3 untouched.
    assert torch.allclose(out, torch.tensor([[2.0 / 2 - 1.0 - 0.25, -4.0 - 0.5 - 0.25, 0.5, 0.5]]))


def test_logprobs_are_the_models_own() -> None:
    logits = torch.randn((2, VOCAB), generator=seeded(3))
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(temperature=0.0)]
    out = Sampler(seeded(0))(logits, [row(p) for p in params])
    reference = torch.log_softmax(logits[0], dim=-1)
    chosen, top = out.logprobs[0]
    assert abs(chosen - reference[out.token_ids[0]].item()) < 1e-5
    assert [t for t, _ in top] == reference.topk(3).indices.tolist()
    assert top[0][0] == out.token_ids[0]
    assert out.logprobs[1] is None


def test_greedy_takes_the_first_of_tied_maxima_like_argmax() -> None:
    logits = torch.randn(6, 49152)
    top = logits.max() + 1
    logits[0, [7, 3, 9000]] = top  # a three-way tie: index 3 comes first
    logits[1, :] = float("-inf")
    logits[1, [40000, 41000]] = 0.0  # everything else forbidden (a grammar mask), two tied survivors
    logits[2, -1] = top  # the last token
    logits[3, 0] = top  # the first token
    out = Sampler(seeded(0))(logits, [row(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.token_ids[:4] == [3, 40000, 49151, 0]


def test_sampled_tokens_follow_the_distribution() -> None:
    """20,000 draws from one row whose mass sits across CDF blocks, zero runs and the padded last block: each
    token's count is within 5 standard deviations of its expectation, and no zero-probability token is drawn."""
    vocab = 3 * CDF_BLOCK + 37  # the last block is padded
    probs = torch.zeros(vocab)
    probs[[0, 5, CDF_BLOCK - 1, CDF_BLOCK, 2 * CDF_BLOCK + 100, vocab - 1]] = torch.tensor([1, 3, 2, 4, 6, 4.0])
    logits = probs.log()[None]  # -inf where the probability is zero
    draws, sampler = 20_000, Sampler(seeded(5))
    counts = torch.zeros(vocab)
    for _ in range(draws // 500):
        out = sampler(logits.expand(500, -1), [row(SamplingParams(temperature=1.0))] * 500)
        counts += torch.bincount(torch.tensor(out.token_ids), minlength=vocab)
    expected = probs / probs.sum() * draws
    assert counts[probs == 0].sum() == 0
    spread = (expected * (1 - expected / draws)).sqrt()
    assert bool(((counts - expected).abs() <= 5 * spread + 1).all()), (counts[probs > 0], expected[probs > 0])


def test_cdf_draws_at_the_ends_land_on_tokens_with_mass() -> None:
    probs = torch.zeros(2, 2 * CDF_BLOCK + 3)
    probs[:, [7, CDF_BLOCK + 1, 2 * CDF_BLOCK + 2]] = torch.tensor([0.25, 0.5, 0.25])
    first = sample_rows(probs, torch.zeros(2))
    last = sample_rows(probs, torch.full((2,), 1 - 2.0**-24))
    middle = sample_rows(probs, torch.tensor([0.3, 0.74]))
    assert first.tolist() == [7, 7] and last.tolist() == [2 * CDF_BLOCK + 2] * 2
    assert middle.tolist() == [CDF_BLOCK + 1, CDF_BLOCK + 1]
    unnormalized = sample_rows(probs * 8, torch.tensor([0.3, 0.8]))  # any positive total
    assert unnormalized.tolist() == [CDF_BLOCK + 1, 2 * CDF_BLOCK + 2]
