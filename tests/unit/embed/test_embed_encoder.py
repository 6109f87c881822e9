"""Encoder and engine without HTTP: vectors equal sentence-transformers, truncation, prefixes, Matryoshka, dtypes.

Comparisons with sentence-transformers pin float32: `auto` is bf16 on a CPU with native bf16 matmul.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from sentence_transformers import SentenceTransformer, models
from transformers import BertConfig, BertModel

from common import c_build, dense_attention_cpu
from common.cpu import cpu_flags, native_bf16_matmul
from common.errors import APIError
from common.health import Readiness
from common.model_files import bundled_embedding_model
from common.schemas.embeddings import EmbeddingRequest
from services.embed.encoder import Encoder, InputTooLong, resolve_dtype, shorten
from services.embed.engine import EmbeddingEngine, encode_vector, served_model
from services.embed.settings import EmbedSettings

TEXTS = ["a", "The spike protein binds the ACE2 receptor on epithelial cells.",
         "mitochondria " * 30, "Does vitamin D lower the risk of fractures in older adults?"]


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder.load(str(bundled_embedding_model()), "cpu", "float32")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight BERT saved as a plain HF directory, using the bundled model's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(bundled_embedding_model() / name, path / name)
    return path


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def embed_texts(encoder: Encoder, texts: list[str], truncate: str = "NONE") -> np.ndarray:
    return np.stack(encoder.embed([one.ids for one in encoder.tokenize(texts, truncate)]))


def test_vectors_equal_sentence_transformers(encoder: Encoder) -> None:
    want = encoder.model.encode(TEXTS, normalize_embeddings=True)
    assert cosines(embed_texts(encoder, TEXTS), want).min() >= 0.999
    assert np.allclose(np.linalg.norm(embed_texts(encoder, TEXTS), axis=1), 1, atol=1e-5)


def test_bfloat16_vectors_stay_close_to_float32_and_unit_length(encoder: Encoder) -> None:
    bf16 = Encoder.load(str(bundled_embedding_model()), "cpu", "bfloat16")
    assert bf16.dtype == torch.bfloat16 and encoder.dtype == torch.float32
    vectors = embed_texts(bf16, TEXTS)
    assert vectors.dtype == np.float32
    assert cosines(vectors, embed_texts(encoder, TEXTS)).min() >= 0.99
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def attention_of(encoder: Encoder) -> set[str]:
    from transformers import PreTrainedModel

    return {m.config._attn_implementation for m in encoder.model.modules() if isinstance(m, PreTrainedModel)}


@pytest.mark.skipif(bool(c_build.AMX_FLAGS - cpu_flags()), reason="this CPU has no AMX bf16")
def test_bfloat16_on_the_amx_attention_kernel_gives_torch_attentions_vectors(encoder: Encoder) -> None:
    kernel = Encoder.load(str(bundled_embedding_model()), "cpu", "bfloat16", cpu_attention="kernel")
    torch_attention = Encoder.load(str(bundled_embedding_model()), "cpu", "bfloat16", cpu_attention="torch")
    assert attention_of(kernel) == {dense_attention_cpu.IMPLEMENTATION} and attention_of(torch_attention) == {"sdpa"}
    texts = [*TEXTS, "padding " * 100]  # one batch: every text but the longest is padded
    vectors = embed_texts(kernel, texts)
    assert cosines(vectors, embed_texts(torch_attention, texts)).min() >= 0.9999
    assert cosines(vectors, embed_texts(encoder, texts)).min() >= 0.999
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_float32_keeps_torch_attention(encoder: Encoder) -> None:
    assert attention_of(encoder) == {"sdpa"}


def test_auto_dtype_is_fp16_on_cuda_and_bf16_only_on_a_cpu_with_native_bf16() -> None:
    assert resolve_dtype("auto", "cuda", cpu_bf16=False)[0] == torch.float16
    assert resolve_dtype("auto", "cuda:1", cpu_bf16=True)[0] == torch.float16
    assert resolve_dtype("auto", "cpu", cpu_bf16=True)[0] == torch.bfloat16
    assert resolve_dtype("auto", "cpu", cpu_bf16=False)[0] == torch.float32
    assert resolve_dtype("auto", "mps", cpu_bf16=True)[0] == torch.float32
    assert resolve_dtype("float32", "cpu", cpu_bf16=True)[0] == torch.float32
    assert resolve_dtype("bfloat16", "cpu", cpu_bf16=False)[0] == torch.bfloat16
    assert resolve_dtype("float16", "cuda", cpu_bf16=False)[0] == torch.float16


def test_auto_dtype_follows_this_cpu() -> None:
    auto = Encoder.load(str(bundled_embedding_model()), "cpu")
    assert auto.dtype == resolve_dtype("auto", "cpu", native_bf16_matmul())[0]


def test_unknown_dtype_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBED_DTYPE", "half")
    with pytest.raises(ValidationError, match="'auto', 'float32', 'bfloat16' or 'float16'"):
        EmbedSettings()


def test_padding_does_not_change_vectors(encoder: Encoder) -> None:
    together = embed_texts(encoder, TEXTS)
    alone = np.stack([embed_texts(encoder, [text])[0] for text in TEXTS])
    assert cosines(together, alone).min() >= 0.99999


def test_token_counts_include_special_tokens(encoder: Encoder) -> None:
    tokenized = encoder.tokenize(["hello world"])
    assert tokenized[0].ids == encoder.tokenizer("hello world")["input_ids"]
    assert len(tokenized[0].ids) == 4 and not tokenized[0].truncated


def test_truncation_sides(encoder: Encoder) -> None:
    text = "zebra " * 300 + "cat " * 300
    with pytest.raises(InputTooLong) as too_long:
        encoder.tokenize(["short", text])
    assert (too_long.value.index, too_long.value.tokens, too_long.value.limit) == (1, 602, 256)
    cat, zebra = encoder.tokenizer.convert_tokens_to_ids(["cat", "zebra"])
    end, start = encoder.tokenize([text], "END")[0], encoder.tokenize([text], "START")[0]
    assert len(end.ids) == len(start.ids) == 256 and end.truncated and start.truncated
    assert set(end.ids[1:-1]) == {zebra} and set(start.ids[1:-1]) == {cat}
    assert end.ids[0] == start.ids[0] == encoder.tokenizer.cls_token_id
    assert end.ids[-1] == start.ids[-1] == encoder.tokenizer.sep_token_id


def test_shorten_renormalises_and_keeps_direction() -> None:
    vector = np.array([3.0, 4.0, 12.0], dtype=np.float32) / 13
    assert np.allclose(shorten(vector, 2), [0.6, 0.8])
    assert shorten(vector, None) is vector and shorten(vector, 3) is vector


def test_base64_is_little_endian_float32() -> None:
    vector = np.array([0.5, -1.25, 3.0], dtype=np.float32)
    raw = base64.b64decode(encode_vector(vector, "base64"))
    assert raw == struct.pack("<3f", 0.5, -1.25, 3.0)
    assert encode_vector(vector, "float") == [0.5, -1.25, 3.0]


def test_plain_hf_encoder_directory_matches_sentence_transformers(tiny_bert: Path) -> None:
    encoder = Encoder.load(str(tiny_bert), "cpu", "float32")
    want = SentenceTransformer(str(tiny_bert), device="cpu").encode(TEXTS[:2], normalize_embeddings=True)
    assert encoder.dimension == 32
    assert cosines(embed_texts(encoder, TEXTS[:2]), want).min() >= 0.999


def test_model_prompts_become_prefixes_and_settings_override_them(tiny_bert: Path, tmp_path: Path) -> None:
    modules = [models.Transformer(str(tiny_bert)), models.Pooling(32, "cls")]
    prompts = {"query": "Represent this question for retrieval: ", "passage": ""}
    SentenceTransformer(modules=modules, prompts=prompts, device="cpu").save(str(tmp_path / "asym"))
    encoder = Encoder.load(str(tmp_path / "asym"), "cpu")
    assert encoder.prefixes == {"query": prompts["query"], "passage": ""}
    overridden = Encoder.load(str(tmp_path / "asym"), "cpu", query_prefix="query: ", passage_prefix="passage: ")
    assert overridden.prefixes == {"query": "query: ", "passage": "passage: "}


def ready_engine(**settings: object) -> EmbeddingEngine:
    engine = EmbeddingEngine(EmbedSettings(**{"dtype": "float32", **settings}), Readiness(), CollectorRegistry())
    engine.load()  # synchronously: the background thread is the app's business
    assert engine.readiness.ready
    return engine


def test_engine_applies_the_query_prefix_by_input_type(encoder: Encoder) -> None:
    engine = ready_engine(query_prefix="query: ")
    try:
        query = asyncio.run(engine.embed(EmbeddingRequest(input="vitamin D", input_type="query")))
        passage = asyncio.run(engine.embed(EmbeddingRequest(input="vitamin D")))
    finally:
        engine.stop()
    want_query, want_passage = encoder.model.encode(["query: vitamin D", "vitamin D"], normalize_embeddings=True)
    assert cosines(np.array(query["data"][0]["embedding"]), want_query)[0] >= 0.999
    assert cosines(np.array(passage["data"][0]["embedding"]), want_passage)[0] >= 0.999
    assert query["usage"]["prompt_tokens"] == len(encoder.tokenizer("query: vitamin D")["input_ids"])


def test_engine_refuses_with_clear_statuses() -> None:
    engine = ready_engine(max_inputs_per_request=2)
    try:
        for request, status in [(EmbeddingRequest(input=["a", "b", "c"]), 413),
                                (EmbeddingRequest(input="a", model="other"), 404),
                                (EmbeddingRequest(input="a", dimensions=1000), 400),
                                (EmbeddingRequest(input="word " * 300), 400)]:
            with pytest.raises(APIError) as refused:
                asyncio.run(engine.embed(request))
            assert refused.value.status == status
    finally:
        engine.stop()


def test_unloaded_engine_answers_503() -> None:
    engine = EmbeddingEngine(EmbedSettings(), Readiness(), CollectorRegistry())
    with pytest.raises(APIError) as refused:
        asyncio.run(engine.embed(EmbeddingRequest(input="a")))
    assert refused.value.status == 503


def test_served_model_ids(tiny_bert: Path) -> None:
    assert served_model(EmbedSettings())[1] == "sentence-transformers/all-MiniLM-L6-v2"
    assert served_model(EmbedSettings(model=str(tiny_bert))) == (str(tiny_bert), tiny_bert.name)
    assert served_model(EmbedSettings(model="BAAI/bge-base-en-v1.5"))[1] == "BAAI/bge-base-en-v1.5"
    assert served_model(EmbedSettings(model=str(tiny_bert), served_model_name="mine"))[1] == "mine"


@pytest.mark.gpu
def test_fp16_on_cuda_matches_fp32_on_cpu(encoder: Encoder) -> None:
    cuda = Encoder.load(str(bundled_embedding_model()), "cuda")
    assert next(cuda.model.parameters()).dtype == torch.float16
    assert cosines(embed_texts(cuda, TEXTS), embed_texts(encoder, TEXTS)).min() >= 0.999
