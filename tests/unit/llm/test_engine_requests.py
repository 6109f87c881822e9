"""Request lifecycle: validation, stop conditions, n > 1, seeds, logprobs, aborts, and no leaked blocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.llm.engine import LLMEngine, SamplingParams

from .conftest import kv_gib_for_blocks
from .test_engine_greedy import assert_no_leaks, random_prompts


@pytest.fixture(scope="module")
def engine(tiny_models: dict[str, Path], make_engine) -> LLMEngine:
    return make_engine(tiny_models["llama"], block_size=4, max_num_batched_tokens=24, max_model_len=256)


@pytest.fixture(autouse=True)
def clean_pool(engine: LLMEngine):
    yield
    assert_no_leaks(engine)


def drain(engine: LLMEngine) -> dict:
    finals = {}
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


def test_engine_attributes(engine: LLMEngine) -> None:
    assert engine.model_name == "llama"
    assert engine.max_model_len == 256
    assert engine.eos_token_ids == {2}
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False)
    assert "w1 w2" in text


def test_prompt_plus_max_tokens_over_context_is_rejected(engine: LLMEngine) -> None:
    with pytest.raises(ValueError, match=r"200.*100.*256"):
        engine.add_request("long", [5] * 200, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("oov", [5, 100_000], SamplingParams())
    engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [5, 6], SamplingParams())
    drain(engine)


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(min_p=1.5), dict(n=0), dict(logprobs=99), dict(presence_penalty=3),
                                 dict(repetition_penalty=0), dict(min_tokens=20, max_tokens=10),
                                 dict(stop_token_ids=[-1])])
def test_invalid_sampling_params_raise_value_error(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_stop_token_ends_with_reason_stop(engine: LLMEngine) -> None:
    prompt = random_prompts(1, 10, 10, seed=3)[0]
    [free] = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    stop_at = free.outputs[0].token_ids[3]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=[stop_at])
    [stopped] = engine.generate([prompt], params, use_tqdm=False)
    first = free.outputs[0].token_ids.index(stop_at)
    assert stopped.outputs[0].token_ids == free.outputs[0].token_ids[:first + 1]
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_token_id == stop_at
    # min_tokens holds the stop token back until enough tokens exist.
    params = SamplingParams(max_tokens=8, min_tokens=first + 2, temperature=0, ignore_eos=True,
                            stop_token_ids=[stop_at])
    [held] = engine.generate([prompt], params, use_tqdm=False)
    assert stop_at not in held.outputs[0].token_ids[:first + 2]


def test_streamed_pieces_add_up_and_timings_are_ordered(engine: LLMEngine) -> None:
    engine.add_request("stream", [7, 8, 9], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    pieces, last = [], None
    while engine.has_unfinished():
        for output in engine.step():
            pieces += output.outputs[0].new_token_ids
            last = output
    assert last is not None and last.finished
    assert pieces == last.outputs[0].token_ids and len(pieces) == 6
    t = last.timings
    assert t.arrival <= t.first_scheduled <= t.first_token <= t.finished
    assert len(t.token_times) == 6 and t.token_times == sorted(t.token_times)


def test_seeded_sampling_reproduces_and_n_completions_differ(engine: LLMEngine) -> None:
    prompt = random_prompts(1, 20, 20, seed=4)[0]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, n=3, ignore_eos=True)
    [first] = engine.generate([prompt], params, use_tqdm=False)
    # The second run shares the batch with other requests; the seed still fixes the text.
    others = random_prompts(3, 5, 30, seed=9)
    results = engine.generate([prompt, *others], [params] + [SamplingParams(max_tokens=5, seed=None)] * 3,
                              use_tqdm=False)
    assert [c.token_ids for c in results[0].outputs] == [c.token_ids for c in first.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    # The siblings reused the first completion's prompt blocks through the prefix cache.
    assert engine.stats().prefix_cache_hits >= 2 * (len(prompt) // 4 - 1) * 4


def test_logprobs_come_with_each_new_token(engine: LLMEngine) -> None:
    [out] = engine.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, logprobs=2, ignore_eos=True),
                            use_tqdm=False)
    completion = out.outputs[0]
    assert [lp.token_id for lp in completion.logprobs] == completion.token_ids
    for lp in completion.logprobs:
        assert len(lp.top) == 2 and lp.top[0][0] == lp.token_id and lp.logprob <= 0


def test_abort_anywhere_frees_blocks(engine: LLMEngine) -> None:
    long_prompt = random_prompts(1, 100, 100, seed=8)[0]
    engine.add_request("mid-prefill", long_prompt, SamplingParams(max_tokens=5))
    engine.add_request("decoding", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("waiting", long_prompt[:50], SamplingParams(max_tokens=5, n=2))
    engine.step()
    engine.step()
    assert engine.requests["mid-prefill"].seqs[0].num_computed_tokens < len(long_prompt)
    for request_id in ("mid-prefill", "decoding", "waiting", "unknown"):
        engine.abort(request_id)
    outputs = engine.step()
    assert sorted(o.request_id for o in outputs) == ["decoding", "mid-prefill", "waiting"]
    assert all(o.finished and o.outputs[0].finish_reason == "abort" for o in outputs)
    assert not engine.has_unfinished()


def test_stats_count_tokens(engine: LLMEngine) -> None:
    before = engine.stats()
    engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    after = engine.stats()
    assert after.prompt_tokens_total - before.prompt_tokens_total == 4
    assert after.generation_tokens_total - before.generation_tokens_total == 3
    assert after.kv_usage == 0.0


def test_abort_during_a_step_is_applied_when_the_step_ends(engine: LLMEngine) -> None:
    engine.add_request("busy", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    with engine._lock:  # what another thread sees while step() runs
        engine.abort("busy")
        assert "busy" in engine.requests
    engine.step()  # finishes its work, then applies the abort and frees the blocks
    assert "busy" not in engine.requests
    outputs = engine.step()
    assert [(o.request_id, o.outputs[0].finish_reason) for o in outputs] == [("busy", "abort")]
    assert not engine.has_unfinished()


def test_hardware_profile_is_detected_and_configured_values_win(engine: LLMEngine, tiny_models: dict[str, Path],
                                                                 make_engine) -> None:
    assert engine.hardware.profile == "cpu-fp32-torch" and not engine.hardware.use_cuda_graphs  # configured fp32
    assert engine.dtype == engine.hardware.dtype
    assert engine.block_size == engine.block_manager.block_size == 4  # configured, not the profile's 16
    default = make_engine(tiny_models["llama"], max_model_len=64, kv_cache_gib=0.01)
    assert default.block_size == default.hardware.kv_block_size == 16
    assert default.hardware.describe()["kv_block_size"] == 16
    # No cap on a step's prompt tokens unless one is configured.
    assert default.scheduler.max_prefill_tokens_per_step == 0
    capped = make_engine(tiny_models["llama"], max_model_len=64, kv_cache_gib=0.01, max_prefill_tokens_per_step=512)
    assert capped.scheduler.max_prefill_tokens_per_step == 512


def test_context_is_clamped_to_what_the_kv_pool_holds(tiny_models: dict[str, Path], make_engine,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    pool = kv_gib_for_blocks(tiny_models["llama"], 8, block_size=4)  # 32 tokens; the model has 512 positions
    assert make_engine(tiny_models["llama"], block_size=4, kv_cache_gib=pool).max_model_len == 32
    with caplog.at_level("WARNING", logger="services.llm.engine.engine"):
        small = make_engine(tiny_models["llama"], block_size=4, kv_cache_gib=pool, max_model_len=256)
    assert small.max_model_len == 32
    assert "max_model_len 256 is more than the KV cache holds" in caplog.text and "32 tokens" in caplog.text
    # A request filling the whole (clamped) context runs; one token more is refused with the numbers.
    [out] = small.generate([[5] * 10], SamplingParams(max_tokens=22, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 22
    with pytest.raises(ValueError, match=r"10 tokens.*23.*33.*context length of 32"):
        small.add_request("over", [5] * 10, SamplingParams(max_tokens=23))
    assert_no_leaks(small)


def test_a_choice_finished_by_stop_string_frees_its_blocks_and_the_others_go_on(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=12, n=2, temperature=1.0, seed=5, ignore_eos=True)
    engine.add_request("n2", [5, 6, 7, 8, 9, 10], params)
    seqs = engine.requests["n2"].seqs
    while min(seq.num_output_tokens for seq in seqs) < 3:
        engine.step()
    stopped, going = seqs[1], seqs[0]
    own_blocks = sum(1 for block in stopped.block_table if engine.block_manager.ref_counts[block] == 1)
    free_before, tokens_at_stop = engine.block_manager.num_free_blocks, stopped.num_output_tokens
    engine.finish_by_stop_string("n2", 1)
    assert engine.block_manager.num_free_blocks == free_before + own_blocks and stopped.block_table == []
    assert stopped not in engine.scheduler.running and going in engine.scheduler.running
    final = drain(engine)["n2"]
    assert [c.finish_reason for c in final.outputs] == ["length", "stop"]
    assert len(final.outputs[0].token_ids) == 12 and len(final.outputs[1].token_ids) == tokens_at_stop
    engine.finish_by_stop_string("n2", 0)  # finished or unknown: ignored
    engine.finish_by_stop_string("unknown", 0)


def test_stopping_the_last_running_choice_ends_the_request(engine: LLMEngine) -> None:
    engine.add_request("one", [5, 6, 7], SamplingParams(max_tokens=30, ignore_eos=True))
    engine.step()
    engine.step()
    engine.finish_by_stop_string("one", 0)
    assert "one" not in engine.requests
    [final] = engine.step()
    assert final.finished and final.outputs[0].finish_reason == "stop" and len(final.outputs[0].token_ids) == 2
    assert not engine.has_unfinished()
