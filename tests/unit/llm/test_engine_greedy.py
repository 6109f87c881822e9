"""Greedy decoding matches transformers token for token, whatever the schedule looks like."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.llm.engine import LLMEngine, RequestOutput, SamplingParams

from .conftest import hf_greedy, kv_gib_for_blocks

NEW_TOKENS = 12


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    # min_tokens = max_tokens bans EOS the way transformers' min_new_tokens does, so lengths hold on both sides.
    return SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0)


def random_prompts(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 384) for _ in range(rng.randint(low, high))] for _ in range(count)]


def run_staggered(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[str, RequestOutput]:
    """Adds request i before step i, so arrivals interleave with prefills and decodes."""
    finals: dict[str, RequestOutput] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        if pending:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params)
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals


def assert_no_leaks(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks
    assert all(count == 0 for count in engine.block_manager.ref_counts)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(8, 3, 70, seed=7)


@pytest.fixture(scope="module")
def expected(tiny_models: dict[str, Path], prompts: list[list[int]]) -> dict[str, list[list[int]]]:
    return {kind: hf_greedy(path, prompts, NEW_TOKENS) for kind, path in tiny_models.items()}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3"])
def test_single_request_matches_transformers(kind: str, tiny_models, make_engine, prompts, expected) -> None:
    engine = make_engine(tiny_models[kind])
    [output] = engine.generate([prompts[5]], greedy(), use_tqdm=False)
    assert output.outputs[0].token_ids == expected[kind][5]
    assert output.outputs[0].finish_reason == "length"
    assert_no_leaks(engine)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "llama3"])
def test_staggered_batch_matches_transformers(kind: str, tiny_models, make_engine, prompts, expected) -> None:
    engine = make_engine(tiny_models[kind])
    finals = run_staggered(engine, prompts, greedy())
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == expected[kind]
    assert_no_leaks(engine)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_elementwise_kernel_keeps_the_tokens(dtype: str, tiny_models, make_engine, prompts) -> None:
    """The C norms, rotary and activation are the eager ops bit for bit: the same greedy tokens, in either dtype."""
    tokens = {}
    for choice in ("kernel", "torch"):
        engine = make_engine(tiny_models["llama3"], dtype=dtype, cpu_elementwise=choice, cpu_compile=False)
        assert (engine.runner.model.model.norm.cpu_kernel is not None) == (choice == "kernel")
        finals = run_staggered(engine, prompts, greedy())
        tokens[choice] = [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]
    assert tokens["kernel"] == tokens["torch"]



def test_an_elementwise_kernel_that_is_not_torchs_bit_for_bit_stays_off(tiny_models, make_engine, monkeypatch,
                                                                        caplog) -> None:
    """The engine checks the C ops against the eager ones at start: where one differs (another torch build's
    summing order, say), the layers keep the eager ops and the log says which op differed."""
    from services.llm.kernels import activation

    eager = activation.silu_and_mul_reference
    monkeypatch.setattr(activation, "silu_and_mul_reference", lambda x: eager(x) * 1.5)
    engine = make_engine(tiny_models["llama3"], dtype="float32", cpu_elementwise="kernel", cpu_compile=False)
    assert engine.runner.model.model.norm.cpu_kernel is None
    assert "silu_and_mul is not bit for bit" in caplog.text

@pytest.mark.parametrize("cpu_attention", ["kernel", "torch"])
def test_either_cpu_decode_attention_matches_transformers(cpu_attention: str, tiny_models, make_engine, prompts,
                                                         expected) -> None:
    engine = make_engine(tiny_models["qwen2"], cpu_attention=cpu_attention, block_size=4)
    assert (engine.runner.attention_kernel is not None) == (cpu_attention == "kernel")
    finals = run_staggered(engine, prompts, greedy())
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == expected["qwen2"]
    assert_no_leaks(engine)


def test_chunked_prefill_matches_transformers(tiny_models, make_engine, prompts, expected) -> None:
    # A 16-token budget splits every prompt over 70 tokens into 5 chunks mixed with other requests' decodes.
    engine = make_engine(tiny_models["llama"], max_num_batched_tokens=16, block_size=4)
    finals = run_staggered(engine, prompts, greedy())
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == expected["llama"]
    assert_no_leaks(engine)


def test_prefix_cache_hit_matches_transformers(tiny_models, make_engine) -> None:
    shared = random_prompts(1, 40, 40, seed=11)[0]
    first, second = [*shared, 10, 11, 12], [*shared, 20, 21]
    want = hf_greedy(tiny_models["qwen2"], [first, second], NEW_TOKENS)
    engine = make_engine(tiny_models["qwen2"], block_size=8)
    [out_first] = engine.generate([first], greedy(), use_tqdm=False)
    [out_second] = engine.generate([second], greedy(), use_tqdm=False)
    assert out_first.num_cached_tokens == 0
    assert out_second.num_cached_tokens == 40  # five full blocks of the shared prefix
    assert [out_first.outputs[0].token_ids, out_second.outputs[0].token_ids] == want
    assert engine.stats().prefix_cache_hits == 40
    # The whole prompt cached: the last block is recomputed so the model still has a token to run.
    [again] = engine.generate([first], greedy(), use_tqdm=False)
    assert again.num_cached_tokens == 40 and again.outputs[0].token_ids == want[0]
    assert_no_leaks(engine)


def test_preemption_matches_transformers(tiny_models, make_engine) -> None:
    # Each request grows to about 10 blocks of 4 tokens; 14 blocks hold one at a time, so decodes preempt.
    prompts = random_prompts(4, 24, 28, seed=5)
    want = hf_greedy(tiny_models["llama"], prompts, NEW_TOKENS)
    engine = make_engine(tiny_models["llama"], block_size=4, max_num_batched_tokens=64,
                         kv_cache_gib=kv_gib_for_blocks(tiny_models["llama"], 14, block_size=4))
    assert engine.stats().num_total_blocks == 14
    outputs = engine.generate(prompts, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == want
    assert engine.stats().num_preemptions > 0
    assert_no_leaks(engine)


def test_without_prefix_caching_matches_transformers(tiny_models, make_engine, prompts, expected) -> None:
    engine = make_engine(tiny_models["llama"], enable_prefix_caching=False, max_num_batched_tokens=32)
    outputs = engine.generate(prompts, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected["llama"]
    assert engine.stats().prefix_cache_hits == 0
    assert_no_leaks(engine)


def test_decode_graph_path_matches_transformers(tiny_models, make_engine, prompts, expected) -> None:
    """The runner's CUDA-graph branch, run on CPU: with no graph captured, `DecodeGraphRunner.run` calls the
    decode step on the live inputs, so this checks the step and the branch wiring; the replay is tests/gpu's."""
    engine = make_engine(tiny_models["llama"])
    engine.runner.capture_decode_graphs(max_batch=4, max_model_len=engine.max_model_len)
    graphs = engine.runner.decode_graphs
    assert graphs is not None and not graphs.enabled  # CPU buffers: nothing is captured
    graphs.enabled = True
    calls = 0
    step = graphs.step

    def counted(inputs):
        nonlocal calls
        calls += 1
        return step(inputs)

    graphs.step = counted
    finals = run_staggered(engine, prompts, greedy())
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == expected["llama"]
    assert calls > 0
    assert_no_leaks(engine)


def test_large_decode_batch_matches_transformers(tiny_models, make_engine) -> None:
    """More decodes than one CPU attention group (sorted by length, run group by group)."""
    many = random_prompts(20, 3, 90, seed=11)
    engine = make_engine(tiny_models["llama"])
    outputs = engine.generate(many, greedy(), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_greedy(tiny_models["llama"], many, NEW_TOKENS)
    assert_no_leaks(engine)
