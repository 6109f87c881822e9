"""The embed service as a real process on loopback, driven by stock clients and raw HTTP."""

from __future__ import annotations

import asyncio
import base64
import random

import httpx
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from common.model_files import bundled_embedding_model
from tests.support.processes import ServiceProcess

MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
# float32: the vectors are compared with sentence-transformers' fp32 ones, and batched with unbatched at 1e-5
# (auto is bf16 on a CPU with native bf16 matmul, where padding moves cosines by a few 1e-5).
ENV = {"HF_HUB_OFFLINE": "1", "EMBED_LOG_LEVEL": "warning", "EMBED_DTYPE": "float32"}
WORDS = ["protein", "cell", "gene", "virus", "tumour", "immune", "receptor", "pathway", "mutation", "enzyme",
         "dose", "trial", "patients", "mice", "signal", "expression", "binding", "membrane", "neuron", "tissue"]


@pytest.fixture(scope="module")
def server() -> ServiceProcess:
    process = ServiceProcess("embed", env=ENV).start()
    try:
        yield process.wait_ready()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(str(bundled_embedding_model()), device="cpu")


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def post(server: ServiceProcess, body: object, **kwargs: object) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", json=body, timeout=30, **kwargs)


def assert_close(got: np.ndarray, want: np.ndarray, threshold: float = 0.999) -> None:
    got, want = np.atleast_2d(got), np.atleast_2d(want)
    cosines = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosines.min() >= threshold, cosines


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def test_openai_client_float_and_base64_match_sentence_transformers(server: ServiceProcess,
                                                                  reference: SentenceTransformer) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    texts = ["The cell membrane regulates transport.", "Mice lacking the gene developed tumours early.",
             "short"]
    want = reference.encode(texts, normalize_embeddings=True)
    floats = client.embeddings.create(input=texts, model=MODEL_ID, encoding_format="float")
    assert floats.model == MODEL_ID
    assert [one.index for one in floats.data] == [0, 1, 2]
    assert_close(np.array([one.embedding for one in floats.data]), want)
    # The openai client asks for base64 by default and decodes it itself.
    default = client.embeddings.create(input=texts, model=MODEL_ID)
    assert_close(np.array([one.embedding for one in default.data]), want)
    tokens = sum(len(ids) for ids in reference.tokenizer(texts)["input_ids"])
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == tokens


def test_base64_is_little_endian_float32(server: ServiceProcess, reference: SentenceTransformer) -> None:
    body = post(server, {"input": "enzyme kinetics", "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert vector.shape == (384,)
    assert_close(vector, reference.encode("enzyme kinetics", normalize_embeddings=True))


def test_nvidia_langchain_client(server: ServiceProcess, reference: SentenceTransformer) -> None:
    from langchain_nvidia_ai_endpoints import NVIDIAEmbeddings

    long_doc = " ".join(["immune response to the virus"] * 120)
    client = NVIDIAEmbeddings(base_url=server.url + "/v1", model=MODEL_ID, truncate="END")
    query = client.embed_query("which receptor binds the virus?")
    docs = client.embed_documents(["the receptor binds the viral spike", long_doc])
    assert_close(np.array(query), reference.encode("which receptor binds the virus?", normalize_embeddings=True))
    # sentence-transformers also keeps the start of over-long text, so END must agree with it.
    assert_close(np.array(docs), reference.encode(["the receptor binds the viral spike", long_doc],
                                                  normalize_embeddings=True))


def test_models_lists_the_served_model_and_model_may_be_omitted(server: ServiceProcess) -> None:
    models = httpx.get(server.url + "/v1/models").json()
    assert [card["id"] for card in models["data"]] == [MODEL_ID]
    assert models["data"][0]["object"] == "model"
    assert post(server, {"input": "x"}).status_code == 200
    assert post(server, {"input": "x", "model": MODEL_ID}).status_code == 200


def test_64_concurrent_mixed_requests_each_get_their_own_vectors(server: ServiceProcess,
                                                               reference: SentenceTransformer) -> None:
    rng = random.Random(7)
    requests = [[sentence(rng, rng.randint(1, 60)) for _ in range(rng.randint(1, 4))] for _ in range(64)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/embeddings", json={"input": texts})
                                          for texts in requests))

    responses = asyncio.run(send_all())
    flat = [text for texts in requests for text in texts]
    want = iter(reference.encode(flat, normalize_embeddings=True))
    for texts, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        data = response.json()["data"]
        assert [one["index"] for one in data] == list(range(len(texts)))
        assert_close(np.array([one["embedding"] for one in data]), np.array([next(want) for _ in texts]))


def test_batched_equals_unbatched(server: ServiceProcess) -> None:
    rng = random.Random(3)
    texts = [sentence(rng, n) for n in (3, 80, 17, 1, 40)]
    together = [one["embedding"] for one in post(server, {"input": texts}).json()["data"]]
    alone = [post(server, {"input": text}).json()["data"][0]["embedding"] for text in texts]
    assert_close(np.array(together), np.array(alone), threshold=0.99999)


def test_truncate_end_keeps_the_start_and_start_keeps_the_end(server: ServiceProcess,
                                                              reference: SentenceTransformer) -> None:
    text = "zebra " * 300 + "cat " * 300  # one token per word: 600 words + 2 special tokens
    kept = 256 - 2
    end = post(server, {"input": text, "truncate": "END"}).json()
    start = post(server, {"input": text, "truncate": "START"}).json()
    assert end["usage"]["prompt_tokens"] == start["usage"]["prompt_tokens"] == 256
    assert_close(np.array(end["data"][0]["embedding"]), reference.encode("zebra " * kept, normalize_embeddings=True))
    assert_close(np.array(start["data"][0]["embedding"]), reference.encode("cat " * kept, normalize_embeddings=True))
    error = assert_openai_error(post(server, {"input": ["fine", text], "truncate": "NONE"}), 400)
    assert "256" in error["message"] and "input[1]" in error["message"]
    # Exactly at the limit is still accepted without truncation.
    assert post(server, {"input": "cat " * kept}).status_code == 200


def test_dimensions_truncates_and_renormalises(server: ServiceProcess) -> None:
    full = np.array(post(server, {"input": "gene expression"}).json()["data"][0]["embedding"])
    short = np.array(post(server, {"input": "gene expression", "dimensions": 64}).json()["data"][0]["embedding"])
    assert short.shape == (64,)
    assert abs(np.linalg.norm(short) - 1) < 1e-5
    assert_close(short, full[:64], threshold=0.99999)


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": []}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": ["ok", ""]}, 400, "input"),
    ({"input": [1, 2]}, 400, "input"),
    ({"input": [[101, 102]]}, 400, "input"),
    ({"input": {"text": "x"}}, 400, "input"),
    ({}, 400, "input"),
    ({"input": "x", "input_type": "document"}, 400, "input_type"),
    ({"input": "x", "truncate": "MIDDLE"}, 400, "truncate"),
    ({"input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "x", "dimensions": 0}, 400, "dimensions"),
    ({"input": "x", "dimensions": -5}, 400, "dimensions"),
    ({"input": "x", "dimensions": 385}, 400, "dimensions"),
    ({"input": "x", "model": "text-embedding-3-small"}, 404, "model"),
])
def test_bad_input_gets_openai_error(server: ServiceProcess, body: dict, status: int, param: str) -> None:
    assert assert_openai_error(post(server, body), status)["param"] == param


def test_malformed_json_is_400(server: ServiceProcess) -> None:
    response = httpx.post(server.url + "/v1/embeddings", content=b'{"input": ["a"',
                          headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_openai_extras_are_accepted(server: ServiceProcess) -> None:
    response = post(server, {"input": "x", "user": "user-1", "nvext": {"anything": 1}, "input_type": "query"})
    assert response.status_code == 200


def test_metrics_count_embedding_work(server: ServiceProcess) -> None:
    post(server, {"input": ["metric probe one", "metric probe two"]})
    text = httpx.get(server.url + "/v1/metrics").text
    for name in ("embed_requests_total", "embed_prompt_tokens_total", "embed_batch_size_bucket",
                 "embed_queue_depth", "embed_request_seconds_bucket", "embed_http_requests_total"):
        assert name in text, name
