"""Grammar-constrained decoding in the engine: whatever a random-weight model wants, the output follows the grammar.

The model is tiny and random but speaks SmolLM2's tokenizer (the bundled model's, 49k byte-level BPE tokens), so
JSON is expressible and the masks are the real ones; a random model's preferences are noise, so validity can only
come from the masks. Hypothesis generates the schemas (the `ci` profile derandomizes them).
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.llm.engine import LLMEngine, SamplingParams
from services.llm.guided import GrammarError, GuidedDecoding

from .test_engine_greedy import assert_no_leaks


@pytest.fixture(scope="module")
def engine(smol_tiny: Path, make_engine) -> LLMEngine:
    return make_engine(smol_tiny, block_size=16, max_model_len=1024, max_num_batched_tokens=512)


@pytest.fixture(autouse=True)
def clean_pool(engine: LLMEngine):
    yield
    assert_no_leaks(engine)


def run(engine: LLMEngine, requests: dict[str, SamplingParams], prompt: str = "Answer in JSON:"
        ) -> dict[str, list[tuple[str, str]]]:
    """All requests in the same engine steps; per request, (text, finish reason) per answer."""
    results = run_ids(engine, requests, prompt)
    return {r: [(text, finish) for text, finish, _ in answers] for r, answers in results.items()}


def run_ids(engine: LLMEngine, requests: dict[str, SamplingParams], prompt: str = "Answer in JSON:"
            ) -> dict[str, list[tuple[str, str, list[int]]]]:
    prompt_ids = engine.tokenizer.encode(prompt)
    for request_id, params in requests.items():
        engine.add_request(request_id, prompt_ids, params)
    tokens: dict[str, dict[int, list[int]]] = {r: {} for r in requests}
    finish: dict[str, dict[int, str]] = {r: {} for r in requests}
    while engine.has_unfinished():
        for output in engine.step():
            for completion in output.outputs:
                tokens[output.request_id].setdefault(completion.index, []).extend(completion.new_token_ids)
                if completion.finish_reason is not None:
                    finish[output.request_id][completion.index] = completion.finish_reason
    return {r: [(engine.tokenizer.decode(tokens[r][i], skip_special_tokens=True), finish[r][i], tokens[r][i])
                for i in sorted(tokens[r])] for r in requests}


# ---- schemas -------------------------------------------------------------------------------------------------

names = st.text(string.ascii_lowercase + "_", min_size=1, max_size=8)
words = st.text(string.ascii_letters + string.digits + " -", min_size=1, max_size=6)


@st.composite
def bounded_range(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    low = draw(st.integers(-1000, 1000))
    schema: dict[str, Any] = {"type": kind}
    if draw(st.booleans()):
        schema["minimum"] = low
    if draw(st.booleans()):
        schema["maximum"] = low + draw(st.integers(0, 500))
    return schema


leaves = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    bounded_range("integer"),
    bounded_range("number"),
    st.integers(0, 10).flatmap(lambda low: st.integers(low, low + 10).map(
        lambda high: {"type": "string", "minLength": low, "maxLength": high})),
    st.lists(words, min_size=1, max_size=4, unique=True).map(lambda values: {"enum": values}),
)


@st.composite
def objects(draw: st.DrawFn, values: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    properties = draw(st.dictionaries(names, values, min_size=1, max_size=4))
    required = [name for name in properties if draw(st.booleans())]
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def arrays(items: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.tuples(items, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})


schemas = objects(st.recursive(leaves, lambda inner: st.one_of(arrays(inner), objects(inner)), max_leaves=6))


def load_json(text: str) -> Any:
    """`json.loads`, except that a number past float range (valid JSON, say 1e999, which Python would read as inf
    and the validator as null) becomes the largest float of its sign: still a number, and outside any bound."""
    def number(literal: str) -> float:
        value = float(literal)
        return value if math.isfinite(value) else math.copysign(sys.float_info.max, value)

    return json.loads(text, parse_float=number)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(schema=schemas, seed=st.integers(0, 2**16))
def test_generated_schemas_always_yield_valid_json(engine: LLMEngine, schema: dict[str, Any], seed: int) -> None:
    params = SamplingParams(max_tokens=400, temperature=1.0, seed=seed, n=2,
                            guided=GuidedDecoding.json_schema(schema))
    validator = jsonschema_rs.validator_for(schema)
    for text, finish in run(engine, {"r": params})["r"]:
        assert finish == "stop", (schema, text)
        validator.validate(load_json(text))


def test_constrained_and_free_requests_share_a_batch(engine: LLMEngine) -> None:
    """Two grammars and an unconstrained greedy request in the same steps: each constrained answer follows its
    own grammar, and the free one is exactly what it is alone (the masks touch only their rows)."""
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = run(engine, {"free": free})["free"]
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    together = run(engine, {
        "free": free,
        "json": SamplingParams(max_tokens=200, temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, seed=3,
                               repetition_penalty=1.2, presence_penalty=0.5, logprobs=3,
                               guided=GuidedDecoding.json_schema(person)),
        "regex": SamplingParams(max_tokens=50, temperature=0.0, guided=GuidedDecoding("regex", r"[A-Z]{3}-\d{2,4}")),
    })
    assert together["free"] == alone
    [(text, finish)] = together["json"]
    assert finish == "stop"
    jsonschema_rs.validate(person, json.loads(text))
    [(code, finish)] = together["regex"]
    assert finish == "stop" and re.fullmatch(r"[A-Z]{3}-\d{2,4}", code)


def test_choice_grammar_and_json_object(engine: LLMEngine) -> None:
    grammar = 'root ::= "yes" | "no" | "maybe " [0-9]'
    results = run(engine, {
        "choice": SamplingParams(max_tokens=20, temperature=1.0, seed=1, n=4,
                                 guided=GuidedDecoding.choice(["red", "green", "blue sky"])),
        "grammar": SamplingParams(max_tokens=20, temperature=1.0, seed=2, n=4,
                                  guided=GuidedDecoding("grammar", grammar)),
        "object": SamplingParams(max_tokens=300, temperature=0.0, guided=GuidedDecoding("json_object")),
    })
    assert all(finish == "stop" and text in ("red", "green", "blue sky") for text, finish in results["choice"])
    assert all(finish == "stop" and re.fullmatch(r"yes|no|maybe [0-9]", text) for text, finish in results["grammar"])
    [(text, finish)] = results["object"]
    if finish == "stop":  # an unbounded object may run out of tokens; what was produced is still its prefix
        assert isinstance(json.loads(text), dict)
    else:
        assert text.startswith("{")


@pytest.mark.parametrize(("guided", "mentions"), [
    (GuidedDecoding("json", "{not json"), "not valid JSON"),
    (GuidedDecoding("json", '{"type": "no-such-type"}'), "JSON schema"),
    (GuidedDecoding("regex", "(unclosed"), "regex"),
    (GuidedDecoding("grammar", "root ::= undefined_rule"), "EBNF"),
])
def test_a_bad_constraint_is_refused_when_added(engine: LLMEngine, guided: GuidedDecoding, mentions: str) -> None:
    with pytest.raises(GrammarError, match=mentions):
        engine.add_request("bad", [1, 2, 3], SamplingParams(max_tokens=4, guided=guided))
    assert not engine.has_unfinished()


def test_guided_decoding_refuses_ignore_eos_and_min_tokens() -> None:
    guided = GuidedDecoding("json_object")
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, guided=guided)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=3, max_tokens=8, guided=guided)


def test_logit_bias_forces_and_bans_tokens(engine: LLMEngine) -> None:
    [(_, _, [favourite])] = run_ids(engine, {"g": SamplingParams(max_tokens=1, temperature=0.0)})["g"]
    target = engine.tokenizer.encode(" banana")[0]
    results = run_ids(engine, {
        "forced": SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logit_bias={target: 100.0}),
        "banned": SamplingParams(max_tokens=1, temperature=0.0, logit_bias={favourite: -100.0}),
        "sampled": SamplingParams(max_tokens=3, temperature=1.0, seed=5, ignore_eos=True,
                                  logit_bias={target: 100.0}),
        "past_vocab": SamplingParams(max_tokens=1, temperature=0.0, logit_bias={10**6: 100.0}),
    })
    assert results["forced"][0][2] == results["sampled"][0][2] == [target] * 3
    assert results["banned"][0][2] != [favourite]
    assert results["past_vocab"][0][2] == [favourite]
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: 101.0})


def test_constrained_requests_beside_speculation(smol_tiny: Path, make_engine) -> None:
    """With prompt-lookup speculation on, constrained sequences get no drafts and still follow their grammar,
    while a free greedy request beside them gives what it gives without speculation."""
    from services.llm.speculative import SpeculativeConfig

    spec = SpeculativeConfig(method="ngram", num_tokens=3, ngram_min=1, ngram_max=3)
    speculating = make_engine(smol_tiny, block_size=16, max_model_len=1024, speculative=spec)
    plain = make_engine(smol_tiny, block_size=16, max_model_len=1024)
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    schema = {"type": "object", "properties": {"code": {"type": "string", "maxLength": 6},
                                               "ok": {"type": "boolean"}},
              "required": ["code", "ok"], "additionalProperties": False}
    prompt = "Answer in JSON: a a a a b b b b a a a a"
    results = run(speculating, {"free": free, "json": SamplingParams(
        max_tokens=100, temperature=0.7, seed=9, n=3, guided=GuidedDecoding.json_schema(schema))}, prompt)
    assert results["free"] == run(plain, {"free": free}, prompt)["free"]
    for text, finish in results["json"]:
        assert finish == "stop"
        jsonschema_rs.validate(schema, json.loads(text))
    assert_no_leaks(speculating)
