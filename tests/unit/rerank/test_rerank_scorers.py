"""Scorers against transformers computing the same thing directly, on tiny random models and the bundled LLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from common.model_files import bundled_llm
from services.rerank.scorers import (
    CrossEncoderScorer,
    DecoderScorer,
    PairTooLong,
    QueryTooLong,
    detect_scorer_kind,
    load_causal_lm,
)
from tests.unit.rerank.tiny_rerank_models import build_causal_lm, build_cross_encoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = torch.device("cpu")
QUERY = "what is the capital of france"
PASSAGES = ["paris is the capital of france", "the cat sat on the mat", "water boils at 100 degrees",
            "a", "stars and planets in the sky, the moon and the earth, trees grow in summer rain"]


@pytest.fixture(scope="module")
def cross_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cross_encoder(tmp_path_factory.mktemp("bert1"), num_labels=1)


@pytest.fixture(scope="module")
def causal_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_causal_lm(tmp_path_factory.mktemp("llama"))


def test_cross_encoder_scores_are_the_model_logits(cross_encoder_dir: Path) -> None:
    scorer = CrossEncoderScorer(str(cross_encoder_dir), CPU)
    scores = scorer.score(scorer.encode(QUERY, PASSAGES, truncate=False))
    tokenizer = AutoTokenizer.from_pretrained(cross_encoder_dir)
    model = AutoModelForSequenceClassification.from_pretrained(cross_encoder_dir).eval()
    for passage, score in zip(PASSAGES, scores, strict=True):
        with torch.no_grad():
            expected = model(**tokenizer(QUERY, passage, return_tensors="pt")).logits[0, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)


def test_two_label_cross_encoder_scores_positive_minus_negative(tmp_path: Path) -> None:
    directory = build_cross_encoder(tmp_path, num_labels=2)
    scorer = CrossEncoderScorer(str(directory), CPU)
    scores = scorer.score(scorer.encode(QUERY, PASSAGES[:2], truncate=False))
    model = AutoModelForSequenceClassification.from_pretrained(directory).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    with torch.no_grad():
        logits = model(**tokenizer([QUERY] * 2, PASSAGES[:2], padding=True, return_tensors="pt")).logits
    assert scores == pytest.approx((logits[:, 1] - logits[:, 0]).tolist(), abs=1e-5)


def test_cross_encoder_truncation(cross_encoder_dir: Path) -> None:
    scorer = CrossEncoderScorer(str(cross_encoder_dir), CPU)
    assert scorer.max_length == 64
    long_passage = " ".join(["the cat sat on the mat"] * 30)
    with pytest.raises(PairTooLong, match="limit of 64"):
        scorer.encode(QUERY, ["short", long_passage], truncate=False)
    pairs = scorer.encode(QUERY, ["short", long_passage], truncate=True)
    assert pairs[1].cost == 64
    assert pairs[1].input_ids[:7] == pairs[0].input_ids[:7]  # the query survives, the passage is cut
    with pytest.raises(QueryTooLong):
        scorer.encode(long_passage, ["short"], truncate=True)


def _full_logits_oracle(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Log-probabilities of every next token, from transformers' own full forward pass."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_query_likelihood_equals_full_forward_and_is_batch_invariant(causal_lm_dir: Path) -> None:
    scorer = DecoderScorer.load(str(causal_lm_dir), "query_likelihood", CPU)
    pairs = scorer.encode(QUERY, PASSAGES, truncate=False)
    batched = scorer.score(pairs)
    one_by_one = [scorer.score([pair])[0] for pair in pairs]
    assert batched == pytest.approx(one_by_one, abs=1e-4)
    reference = AutoModelForCausalLM.from_pretrained(causal_lm_dir).eval()
    for pair, score in zip(pairs, batched, strict=True):
        logp = _full_logits_oracle(reference, pair.input_ids)
        start = pair.cost - pair.query_tokens
        expected = torch.stack([logp[t - 1, pair.input_ids[t]] for t in range(start, pair.cost)]).mean().item()
        assert score == pytest.approx(expected, abs=1e-4)
    query_ids = scorer.tokenizer(" " + QUERY, add_special_tokens=False)["input_ids"]
    assert all(pair.input_ids[-pair.query_tokens:] == query_ids for pair in pairs)


def test_yes_no_equals_full_forward_and_is_batch_invariant(causal_lm_dir: Path) -> None:
    scorer = DecoderScorer.load(str(causal_lm_dir), "yes_no", CPU)
    pairs = scorer.encode(QUERY, PASSAGES, truncate=False)
    batched = scorer.score(pairs)
    assert batched == pytest.approx([scorer.score([pair])[0] for pair in pairs], abs=1e-4)
    reference = AutoModelForCausalLM.from_pretrained(causal_lm_dir).eval()
    yes, no = scorer.tokenizer("yes", add_special_tokens=False)["input_ids"][0], \
        scorer.tokenizer("no", add_special_tokens=False)["input_ids"][0]
    assert yes in scorer.yes_ids and no in scorer.no_ids
    for pair, score in zip(pairs, batched, strict=True):
        last = _full_logits_oracle(reference, pair.input_ids)[-1]
        expected = torch.logsumexp(last[scorer.yes_ids], 0) - torch.logsumexp(last[scorer.no_ids], 0)
        assert score == pytest.approx(expected.item(), abs=1e-4)
    text = scorer.tokenizer.decode(pairs[0].input_ids)
    assert "<|im_start|>assistant" in text and QUERY in text and PASSAGES[0] in text  # chat template used


def test_decoder_truncation_cuts_only_the_passage(causal_lm_dir: Path) -> None:
    tokenizer, model = load_causal_lm(str(causal_lm_dir), CPU)
    scorer = DecoderScorer(tokenizer, model, "query_likelihood", max_length=48)
    long_passage = " ".join(["the cat sat on the mat"] * 20)
    with pytest.raises(PairTooLong, match="limit of 48"):
        scorer.encode(QUERY, [long_passage], truncate=False)
    pair, short = scorer.encode(QUERY, [long_passage, "cats"], truncate=True)
    assert pair.cost == 48 and pair.query_tokens == short.query_tokens
    assert pair.input_ids[-pair.query_tokens:] == short.input_ids[-short.query_tokens:]
    with pytest.raises(QueryTooLong):
        scorer.encode(long_passage, ["cats"], truncate=True)


def test_auto_detection(cross_encoder_dir: Path, causal_lm_dir: Path) -> None:
    assert detect_scorer_kind(str(cross_encoder_dir)) == "cross_encoder"
    assert detect_scorer_kind(str(causal_lm_dir)) == "query_likelihood"
    assert detect_scorer_kind(str(bundled_llm())) == "query_likelihood"


@pytest.fixture(scope="module")
def smollm() -> tuple:
    return load_causal_lm(str(bundled_llm()), CPU)


CASES = [
    ("What is the boiling point of water at sea level?",
     ["Water boils at 100 degrees Celsius at sea level under standard atmospheric pressure.",
      "The Eiffel Tower is a wrought-iron lattice tower in Paris, France.",
      "Python is a popular programming language created by Guido van Rossum."]),
    ("Who wrote the play Romeo and Juliet?",
     ["Photosynthesis converts light energy into chemical energy in plants.",
      "Romeo and Juliet is a tragedy written by William Shakespeare early in his career.",
      "The stock market fell sharply on Monday after the interest rate decision."]),
    ("How many legs does a spider have?",
     ["The Great Wall of China stretches thousands of kilometres across northern China.",
      "Mount Everest is the highest mountain above sea level.",
      "Spiders are arachnids and have eight legs, unlike insects, which have six."]),
    ("What is the capital of Japan?",
     ["Tokyo is the capital and largest city of Japan.",
      "Bananas are rich in potassium.",
      "The Amazon river flows through South America."]),
]
RELEVANT = [0, 1, 2, 0]


def test_default_query_likelihood_ranks_the_relevant_passage_first(smollm: tuple) -> None:
    scorer = DecoderScorer(*smollm, "query_likelihood")
    for (query, passages), relevant in zip(CASES, RELEVANT, strict=True):
        scores = scorer.score(scorer.encode(query, passages, truncate=True))
        assert max(range(len(scores)), key=scores.__getitem__) == relevant, (query, scores)


@pytest.mark.parametrize("mode", ["query_likelihood", "yes_no"])
def test_smollm_scores_batched_equal_one_by_one(smollm: tuple, mode: str) -> None:
    scorer = DecoderScorer(*smollm, mode)  # type: ignore[arg-type]
    pairs = [pair for query, passages in CASES[:2] for pair in scorer.encode(query, passages, truncate=True)]
    batched = scorer.score(pairs)
    assert batched == pytest.approx([scorer.score([pair])[0] for pair in pairs], abs=1e-4)
