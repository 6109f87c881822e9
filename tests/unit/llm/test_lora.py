"""Multi-LoRA: every adapter's greedy output equals PEFT's with that adapter merged, also when requests for
different adapters and the base model share steps; the prefix cache never mixes adapters."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.llm.engine import LLMEngine
from services.llm.speculative import SpeculativeConfig

from .conftest import hf_greedy
from .lora_adapters import ADAPTERS, peft_merged_greedy, save_adapter
from .test_engine_greedy import assert_no_leaks, greedy, random_prompts, run_staggered

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def adapters(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    return {name: save_adapter(tiny_models["llama"], root, name, seed) for seed, name in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(6, 3, 40, seed=21)


@pytest.fixture(scope="module")
def expected(tiny_models, adapters, prompts) -> dict[str | None, list[list[int]]]:
    base = tiny_models["llama"]
    result: dict[str | None, list[list[int]]] = {None: hf_greedy(base, prompts, NEW_TOKENS)}
    for name, path in adapters.items():
        result[name] = peft_merged_greedy(base, path, prompts, NEW_TOKENS)
        assert result[name] != result[None], f"adapter {name} changes nothing: the test would prove nothing"
    return result


def lora_engine(make_engine, tiny_models, adapters, max_loras: int = 4, **overrides: object) -> LLMEngine:
    engine: LLMEngine = make_engine(tiny_models["llama"], max_loras=max_loras, max_lora_rank=8, **overrides)
    for name, path in adapters.items():
        if len(engine.lora_adapters()) < max_loras:
            engine.load_lora(name, str(path))
    return engine


def run_mixed(engine: LLMEngine, prompts: list[list[int]], names: list[str | None]) -> dict[tuple[int, str | None],
                                                                                           list[int]]:
    """Every prompt under every name, arriving one per step so adapters and the base model share steps."""
    arrivals = [(i, name) for i in range(len(prompts)) for name in names]
    finals: dict[tuple[int, str | None], list[int]] = {}
    ids = {}
    while arrivals or engine.has_unfinished():
        if arrivals:
            i, name = arrivals.pop(0)
            ids[f"r{i}-{name}"] = (i, name)
            engine.add_request(f"r{i}-{name}", prompts[i], greedy(NEW_TOKENS), lora_name=name)
        for output in engine.step():
            if output.finished:
                finals[ids[output.request_id]] = output.outputs[0].token_ids
    return finals


def test_mixed_adapters_and_base_match_peft_merged(tiny_models, make_engine, adapters, prompts, expected) -> None:
    engine = lora_engine(make_engine, tiny_models, adapters)
    names: list[str | None] = [None, *adapters]
    finals = run_mixed(engine, prompts, names)
    for name in names:
        assert [finals[(i, name)] for i in range(len(prompts))] == expected[name], name
    assert_no_leaks(engine)


def test_adapters_with_speculation_match_peft_merged(tiny_models, make_engine, adapters, prompts, expected) -> None:
    # Drafts run through the adapter's layers like any other token of the sequence: still PEFT's answers.
    spec = SpeculativeConfig(method="ngram", num_tokens=3, ngram_min=1, ngram_max=3)
    engine = lora_engine(make_engine, tiny_models, adapters, speculative=spec)
    names: list[str | None] = [None, "all", "qv"]
    finals = run_mixed(engine, prompts, names)
    for name in names:
        assert [finals[(i, name)] for i in range(len(prompts))] == expected[name], name
    assert engine.stats().spec_draft_tokens_total > 0
    assert_no_leaks(engine)


def test_base_model_is_untouched_by_lora_layers(tiny_models, make_engine, adapters, prompts, expected) -> None:
    engine = lora_engine(make_engine, tiny_models, adapters)
    finals = run_staggered(engine, prompts, greedy(NEW_TOKENS))
    assert [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))] == expected[None]


def test_prefix_cache_is_keyed_by_adapter(tiny_models, make_engine, adapters) -> None:
    engine = lora_engine(make_engine, tiny_models, adapters, block_size=4)
    prompt = random_prompts(1, 30, 30, seed=3)[0]

    def cached(name: str | None) -> int:
        [out] = engine.generate([prompt], greedy(2), use_tqdm=False, lora_names=[name])
        return out.num_cached_tokens

    assert cached(None) == 0
    assert cached("attn") == 0  # the base model's blocks hold other keys and values
    assert cached("all") == 0
    assert cached("attn") == 28  # its own blocks: every full block before the last token
    assert cached(None) == 28
    # A reloaded adapter (other weights under the same name) starts afresh.
    engine.unload_lora("attn")
    engine.load_lora("attn", str(adapters["mlp"]))
    assert cached("attn") == 0


def test_adapter_load_and_unload_rules(tiny_models, make_engine, adapters, tmp_path) -> None:
    engine = lora_engine(make_engine, tiny_models, adapters, max_loras=2)
    assert [a.name for a in engine.lora_adapters()] == ["attn", "all"]
    with pytest.raises(ValueError, match="already loaded"):
        engine.load_lora("attn", str(adapters["attn"]))
    with pytest.raises(ValueError, match="slots are in use"):
        engine.load_lora("mlp", str(adapters["mlp"]))
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        engine.unload_lora("nope")
    with pytest.raises(ValueError, match="no LoRA adapter named"):
        engine.add_request("r", [5, 6, 7], greedy(2), lora_name="nope")
    engine.add_request("busy", [5, 6, 7], greedy(4), lora_name="all")
    with pytest.raises(ValueError, match="in use"):
        engine.unload_lora("all")
    while engine.has_unfinished():
        engine.step()
    engine.unload_lora("all")
    engine.load_lora("mlp", str(adapters["mlp"]))
    assert sorted(a.name for a in engine.lora_adapters()) == ["attn", "mlp"]
    small = make_engine(tiny_models["llama"], max_loras=1, max_lora_rank=4)
    with pytest.raises(ValueError, match="has no adapter_config"):
        small.load_lora("x", str(tmp_path))
    with pytest.raises(ValueError, match="max LoRA rank"):
        small.load_lora("all", str(adapters["all"]))
    assert small.lora_adapters() == []
    with pytest.raises(ValueError, match="not enabled"):
        make_engine(tiny_models["llama"]).load_lora("attn", str(adapters["attn"]))
