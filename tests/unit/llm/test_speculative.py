"""Speculative decoding: greedy output is the same with it on, whatever the schedule; sampling keeps the target's
distribution; rejected drafts leave no blocks behind."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.llm.engine import LLMEngine, SamplingParams
from services.llm.speculative import SpeculativeConfig
from services.llm.speculative.ngram import lookup

from .conftest import hf_greedy, kv_gib_for_blocks
from .test_engine_greedy import assert_no_leaks, greedy, run_staggered

NEW_TOKENS = 24
NGRAM = SpeculativeConfig(method="ngram", num_tokens=4, ngram_min=1, ngram_max=3)


def repetitive_prompts(count: int, seed: int) -> list[list[int]]:
    """Prompts that repeat a phrase, so prompt lookup has something to propose (random tiny models also fall
    into loops of their own, which it catches too)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        phrase = [rng.randrange(4, 384) for _ in range(rng.randint(3, 8))]
        filler = [rng.randrange(4, 384) for _ in range(rng.randint(0, 20))]
        prompts.append(filler + phrase * rng.randint(2, 5) + phrase[:rng.randint(1, len(phrase))])
    return prompts


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return repetitive_prompts(8, seed=11)


@pytest.fixture(scope="module")
def expected(tiny_models: dict[str, Path], prompts: list[list[int]]) -> list[list[int]]:
    return hf_greedy(tiny_models["llama"], prompts, NEW_TOKENS)


def test_lookup_takes_the_longest_suffix_and_its_latest_occurrence() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(tokens, 1, 3, 2) == [7, 8]  # "2 3" last occurred before "7 8" ("5 2 3" never did)
    assert lookup(tokens, 1, 1, 3) == [7, 8, 5]  # n = 1: the latest earlier "3"
    assert lookup([4, 5, 6], 1, 3, 2) == []


def test_greedy_matches_transformers_with_ngram_speculation(tiny_models, make_engine, prompts, expected) -> None:
    engine: LLMEngine = make_engine(tiny_models["llama"], speculative=NGRAM)
    finals = run_staggered(engine, prompts, greedy(NEW_TOKENS))
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == expected
    stats = engine.stats()
    assert stats.spec_draft_tokens_total > 0 and 0 < stats.spec_accepted_tokens_total <= stats.spec_draft_tokens_total
    assert stats.generation_tokens_total == NEW_TOKENS * len(prompts)
    assert_no_leaks(engine)


def test_speculation_survives_preemption_chunking_and_prefix_caching(tiny_models, make_engine, prompts,
                                                                     expected) -> None:
    # 24 blocks of 4 tokens cannot hold all eight sequences: preemptions while drafts come and go; each prompt is
    # sent twice, so the second copy is served from blocks the first one computed with speculation on.
    engine: LLMEngine = make_engine(tiny_models["llama"], speculative=NGRAM, block_size=4,
                                    kv_cache_gib=kv_gib_for_blocks(tiny_models["llama"], 24, block_size=4),
                                    max_num_batched_tokens=24)
    finals = run_staggered(engine, prompts + prompts, greedy(NEW_TOKENS))
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(2 * len(prompts))] == expected + expected
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0 and stats.spec_accepted_tokens_total > 0
    assert_no_leaks(engine)


def test_accepted_drafts_reach_the_prefix_cache(tiny_models, make_engine, prompts, expected) -> None:
    # Accepted drafts' KV is written a step before the tokens join the sequence: the blocks holding them must be
    # published under the right hashes, so a follow-up prompt that repeats the answer finds them all cached.
    # The model drafting for itself gets (nearly) every draft accepted, so accepted runs end in every block slot.
    spec = SpeculativeConfig(method="draft", num_tokens=3, draft_model=str(tiny_models["llama"]))
    engine: LLMEngine = make_engine(tiny_models["llama"], speculative=spec, block_size=4)
    finals = run_staggered(engine, prompts[:4], greedy(NEW_TOKENS))
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(4)] == expected[:4]
    assert engine.stats().spec_accepted_tokens_total >= 40
    follow_ups = [prompt + answer[:cut] for prompt, answer in zip(prompts[:4], expected, strict=False)
                  for cut in (5, 10, 15, 20)]
    cached = [out.num_cached_tokens for out in engine.generate(follow_ups, greedy(1), use_tqdm=False)]
    assert cached == [(len(prompt) - 1) // 4 * 4 for prompt in follow_ups]
    assert_no_leaks(engine)


def test_abort_during_speculation_frees_everything(tiny_models, make_engine, prompts, expected) -> None:
    engine: LLMEngine = make_engine(tiny_models["llama"], speculative=NGRAM)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, greedy(NEW_TOKENS))
    finals = {}
    for _ in range(NEW_TOKENS // 2):  # until drafts are in flight
        for output in engine.step():
            assert not output.finished
        if engine.stats().spec_draft_tokens_total > 0:
            break
    assert engine.stats().spec_draft_tokens_total > 0
    engine.abort("r3")
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    assert finals["r3"].outputs[0].finish_reason == "abort"
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts)) if i != 3] == \
        [tokens for i, tokens in enumerate(expected) if i != 3]
    assert_no_leaks(engine)


def test_stop_tokens_and_logprobs_with_speculation(tiny_models, make_engine, prompts, expected) -> None:
    # A stop token inside an accepted run of drafts ends the sequence there; logprobs come for every token.
    stop = expected[0][10]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=[stop], logprobs=2)
    on = make_engine(tiny_models["llama"], speculative=NGRAM).generate([prompts[0]], params, use_tqdm=False)[0]
    off = make_engine(tiny_models["llama"]).generate([prompts[0]], params, use_tqdm=False)[0]
    assert on.outputs[0].token_ids == off.outputs[0].token_ids == expected[0][:expected[0].index(stop) + 1]
    assert on.outputs[0].finish_reason == "stop"
    assert [lp.token_id for lp in on.outputs[0].logprobs] == on.outputs[0].token_ids
    for a, b in zip(on.outputs[0].logprobs, off.outputs[0].logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_draft_model_greedy_matches_transformers(tiny_models, make_engine, prompts, expected) -> None:
    # The qwen2 tiny model shares the vocabulary; a model drafting for itself has (nearly) every draft accepted.
    for draft, all_accepted in (("qwen2", False), ("llama", True)):
        spec = SpeculativeConfig(method="draft", num_tokens=3, draft_model=str(tiny_models[draft]))
        engine: LLMEngine = make_engine(tiny_models["llama"], speculative=spec, block_size=4,
                                        kv_cache_gib=kv_gib_for_blocks(tiny_models["llama"], 40, block_size=4))
        finals = run_staggered(engine, prompts, greedy(NEW_TOKENS))
        assert [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == expected
        stats = engine.stats()
        assert stats.spec_draft_tokens_total > 0
        if all_accepted:  # the same model in another batch shape: only a float near-tie could differ
            assert stats.spec_accepted_tokens_total >= 0.95 * stats.spec_draft_tokens_total
        assert_no_leaks(engine)


def test_speculation_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig(method="medusa")
    with pytest.raises(ValueError, match="draft model"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ValueError, match="ngram_min"):
        SpeculativeConfig(method="ngram", ngram_min=3, ngram_max=2)

