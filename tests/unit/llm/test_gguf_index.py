"""The GGUF index (`services/llm/gguf_file.py`): the first load of a file keeps its configuration, tokenizer,
name map and tensor layout under the Hugging Face cache; later loads read that instead of the file's metadata
and give the same model."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from common.model_files import ModelNotFound, bundled_llm
from services.llm import gguf_file

from .gguf_files import write_tiny_gguf

TEXTS = ["Hello, world!", "  leading spaces and trailing  ", "naïve café — 東京 🙂", "the theater in the rain",
         "<|im_start|>user\nhi<|im_end|>", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf"))
    gguf_file._index.cache_clear()  # the process keeps the indexes it has read
    yield tmp_path / "hf" / "rag-platform" / "gguf"
    gguf_file._index.cache_clear()


def fails(*args, **kwargs):
    raise AssertionError("the file's metadata was read again")


def same_tokenizer(ours, theirs) -> None:
    for text in TEXTS:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
        assert ours.decode(theirs(text)["input_ids"]) == theirs.decode(theirs(text)["input_ids"])
    assert ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id, len(ours)) == \
        (theirs.eos_token_id, theirs.bos_token_id, theirs.pad_token_id, len(theirs))


def test_later_loads_read_the_index_instead_of_the_file(tmp_path: Path, cache: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import gguf
    import transformers.modeling_gguf_pytorch_utils as hf_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", "Q8_0")
    config, tokenizer = gguf_file.read_metadata(path)
    tensors = dict(gguf_file.dequantized_tensors(path))
    kept = list(cache.iterdir())
    assert len(kept) == 1 and (kept[0] / "index.json").is_file() and (kept[0] / "tokenizer").is_dir()

    gguf_file._index.cache_clear()  # as a new process would
    monkeypatch.setattr(gguf, "GGUFReader", fails)
    monkeypatch.setattr(hf_gguf, "load_gguf_checkpoint", fails)
    again_config, again_tokenizer = gguf_file.read_metadata(path)
    again = dict(gguf_file.dequantized_tensors(path))
    assert again_config == config
    same_tokenizer(again_tokenizer, tokenizer)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert list(cache.iterdir()) == kept


def test_a_changed_file_gets_a_new_index(tmp_path: Path, cache: Path) -> None:
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "Q8_0", seed=1)
    first = dict(gguf_file.dequantized_tensors(path))
    write_tiny_gguf(path, "Q8_0", seed=2)  # same name and size, other weights
    second = dict(gguf_file.dequantized_tensors(path))
    assert len(list(cache.iterdir())) == 2
    assert not torch.equal(first["model.layers.0.mlp.down_proj.weight"], second["model.layers.0.mlp.down_proj.weight"])


def test_an_unwritable_cache_still_loads_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from huggingface_hub import constants

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(constants, "HF_HOME", str(blocked / "hf"))  # under a file: no folder can be made there
    gguf_file._index.cache_clear()
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "Q4_0")
    with caplog.at_level(logging.WARNING, logger=gguf_file.__name__):
        config, tokenizer = gguf_file.read_metadata(path)
        tensors = dict(gguf_file.dequantized_tensors(path))
    gguf_file._index.cache_clear()
    assert "could not keep its GGUF index" in caplog.text
    assert config["num_hidden_layers"] == 2 and "model.embed_tokens.weight" in tensors
    assert tokenizer.apply_chat_template(MESSAGES[1:], tokenize=False).startswith("<|im_start|>user")


def test_the_bundled_files_indexed_tokenizer_is_transformers_own() -> None:
    """The real vocabulary (byte-level BPE, ChatML specials, the chat template) through save and load."""
    from transformers import AutoTokenizer

    try:
        path = bundled_llm()
    except ModelNotFound as missing:
        pytest.skip(str(missing))
    _, ours = gguf_file.read_metadata(path)
    same_tokenizer(ours, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
