"""Multi-LoRA over HTTP: LLM_LORA_MODULES at start, vLLM's load/unload endpoints at run time, `model` picks the
adapter (official openai client), /v1/models lists adapters with their base. Answers are PEFT's, merged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.processes import ServiceProcess
from tests.unit.llm.conftest import hf_greedy, save_tiny_model
from tests.unit.llm.lora_adapters import peft_merged_greedy, save_adapter

NEW_TOKENS = 8
PROMPTS = [[11, 57, 203, 9, 300, 41, 77], [5, 6, 7, 8, 150, 151]]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-api")
    base = save_tiny_model(root, "llama")
    return {"base": base, "attn": save_adapter(base, root, "attn", seed=0), "mlp": save_adapter(base, root, "mlp", 1)}


@pytest.fixture(scope="module")
def server(files: dict[str, Path]) -> Iterator[ServiceProcess]:
    env = {"HF_HUB_OFFLINE": "1", "LLM_MODEL": str(files["base"]), "LLM_DEVICE": "cpu", "LLM_DTYPE": "float32",
           "LLM_KV_CACHE_GIB": "0.01", "LLM_SERVED_MODEL_NAME": "tiny", "LLM_MAX_LORAS": "2",
           "LLM_MAX_LORA_RANK": "8", "LLM_LORA_MODULES": f"attn={files['attn']}"}
    process = ServiceProcess("llm", env=env).start()
    try:
        yield process.wait_ready()
    finally:
        process.stop()


def answers(client: openai.OpenAI, model: str) -> list[list[int]]:
    result = client.completions.create(model=model, prompt=PROMPTS, max_tokens=NEW_TOKENS, temperature=0,
                                       logprobs=0, extra_body={"min_tokens": NEW_TOKENS})
    choices = sorted(result.choices, key=lambda c: c.index)
    assert all(c.logprobs is not None for c in choices)
    return [[token_id(token) for token in c.logprobs.tokens] for c in choices]


def token_id(text: str) -> int:
    """The tiny test vocabulary: four special tokens, then "w<i>" is id i + 4."""
    special = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    return special[text] if text in special else int(text[1:]) + 4


def test_adapters_at_start_and_at_run_time(server: ServiceProcess, files: dict[str, Path]) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    models = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(models) == {"tiny", "attn"} and models["attn"]["parent"] == "tiny"
    assert models["attn"]["root"] == str(files["attn"])

    base = hf_greedy(files["base"], PROMPTS, NEW_TOKENS)
    assert answers(client, "tiny") == base
    assert answers(client, "attn") == peft_merged_greedy(files["base"], files["attn"], PROMPTS, NEW_TOKENS) != base

    with pytest.raises(openai.NotFoundError):
        answers(client, "mlp")
    loaded = httpx.post(server.url + "/v1/load_lora_adapter", json={"lora_name": "mlp", "lora_path": str(files["mlp"])})
    assert loaded.status_code == 200, loaded.text
    assert answers(client, "mlp") == peft_merged_greedy(files["base"], files["mlp"], PROMPTS, NEW_TOKENS)
    chat = client.chat.completions.create(model="mlp", messages=[{"role": "user", "content": "w1 w2"}], max_tokens=2)
    assert chat.model == "mlp"

    refused = [httpx.post(server.url + "/v1/load_lora_adapter", json=body) for body in (
        {"lora_name": "mlp", "lora_path": str(files["mlp"])},  # the name is taken
        {"lora_name": "more", "lora_path": str(files["attn"])},  # both slots are in use
        {"lora_name": "tiny", "lora_path": str(files["attn"])},  # the base model's id
        {"lora_name": "x", "lora_path": "/nonexistent/adapter"})]
    assert [r.status_code for r in refused] == [400] * 4
    assert all(r.json()["error"]["message"] for r in refused)

    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "mlp"}).status_code == 200
    assert httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "mlp"}).status_code == 404
    assert {m.id for m in client.models.list().data} == {"tiny", "attn"}
    with pytest.raises(openai.NotFoundError):
        answers(client, "mlp")
