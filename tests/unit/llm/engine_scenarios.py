"""Every schedule shape the engine has, as small runs over the tiny random models (`conftest.tiny_models`).

Each scenario takes an engine builder (any device, any dtype) and returns the greedy tokens plus the
statistics that show the shape really happened. `test_engine_triton.py` runs them through Triton's interpreter
on the CPU; `tests/gpu/test_engine_triton_gpu.py` runs them compiled on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.llm.engine import LLMEngine, SamplingParams

from .test_engine_greedy import greedy, random_prompts, run_staggered


@dataclass(slots=True)
class Run:
    tokens: list[list[int]]
    stats: dict[str, int]  # what shows the schedule shape happened


def prefill_and_decode(build: Callable[..., LLMEngine], models: dict[str, Path], dtype: str) -> Run:
    engine = build(models["llama"], dtype=dtype, num_kv_blocks=64)
    outputs = engine.generate(random_prompts(2, 20, 30, seed=1), greedy(8), use_tqdm=False)
    return Run([o.outputs[0].token_ids for o in outputs], {})


def long_context(build: Callable[..., LLMEngine], models: dict[str, Path], dtype: str) -> Run:
    # Two 256-token blocks make the context long enough for decode to split it over two programs per KV head
    # and reduce them.
    engine = build(models["llama"], dtype=dtype, block_size=256, num_kv_blocks=4)
    outputs = engine.generate(random_prompts(1, 260, 260, seed=6), greedy(6), use_tqdm=False)
    return Run([o.outputs[0].token_ids for o in outputs], {})


def chunked_and_mixed(build: Callable[..., LLMEngine], models: dict[str, Path], dtype: str) -> Run:
    # A 16-token budget cuts prompts of up to 40 tokens into chunks that share steps with other requests' decodes.
    engine = build(models["llama"], dtype=dtype, max_num_batched_tokens=16, block_size=4, num_kv_blocks=128)
    prompts = random_prompts(5, 3, 40, seed=2)
    finals = run_staggered(engine, prompts, greedy(6))
    return Run([finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))], {})


def prefix_hit(build: Callable[..., LLMEngine], models: dict[str, Path], dtype: str) -> Run:
    engine = build(models["qwen2"], dtype=dtype, block_size=8, num_kv_blocks=64)
    shared = random_prompts(1, 24, 24, seed=3)[0]
    tokens, cached = [], []
    for prompt in ([*shared, 10, 11, 12], [*shared, 20, 21], [*shared, 10, 11, 12]):
        [out] = engine.generate([prompt], greedy(6), use_tqdm=False)
        tokens.append(out.outputs[0].token_ids)
        cached.append(out.num_cached_tokens)
    assert cached[1] == 24 and cached[2] == 24, cached
    return Run(tokens, {"prefix_cache_hits": engine.stats().prefix_cache_hits})


def preemption(build: Callable[..., LLMEngine], models: dict[str, Path], dtype: str) -> Run:
    # 14 blocks of 4 tokens hold one request at a time.
    engine = build(models["llama"], dtype=dtype, block_size=4, max_num_batched_tokens=64, num_kv_blocks=14)
    outputs = engine.generate(random_prompts(3, 24, 28, seed=4), greedy(10), use_tqdm=False)
    assert engine.stats().num_preemptions > 0
    return Run([o.outputs[0].token_ids for o in outputs], {"preemptions": engine.stats().num_preemptions})


def n_greater_than_one(build: Callable[..., LLMEngine], models: dict[str, Path], dtype: str) -> Run:
    # llama3: MQA and llama3 RoPE scaling; siblings share the prompt's blocks and decode side by side.
    engine = build(models["llama3"], dtype=dtype, num_kv_blocks=64)
    params = SamplingParams(n=3, max_tokens=6, min_tokens=6, temperature=0.0)
    outputs = engine.generate(random_prompts(2, 10, 20, seed=5), params, use_tqdm=False)
    return Run([c.token_ids for o in outputs for c in o.outputs], {})


SCENARIOS = {"prefill+decode": prefill_and_decode, "long context (split decode)": long_context,
             "chunked prefill, mixed prefill+decode": chunked_and_mixed, "prefix-cache hit": prefix_hit,
             "preemption": preemption, "n>1": n_greater_than_one}
