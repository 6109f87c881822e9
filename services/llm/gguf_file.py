"""A GGUF file read the way transformers' GGUF reader reads it, one tensor at a time.

The configuration and tokenizer come from transformers (`load_gguf_checkpoint` without tensors, and the
tokenizer's GGUF support). The tensors are dequantized here, lazily, with the same steps as the reader's own loop
(`gguf.dequantize`, the architecture's tensor processor, which undoes llama.cpp's Q/K row permutation for
Llama, and the reader's GGUF -> Hugging Face name map): the loader copies each into the model as it comes, so
the host holds one fp32 tensor at a time instead of the whole model, and tensors kept in their block format
(`gguf_blocks.py`) are never dequantized at all.

Reading a file's metadata that way is slow: the `gguf` reader walks the vocabulary's strings element by element,
and transformers parses the file once for the configuration and again for the tokenizer (about 40 s for the
bundled 135M model on a 2-core machine). So the first load keeps what it read in an index, under the Hugging Face
cache (`$HF_HOME/rag-platform/gguf/`, the model volume in the containers): the configuration, the converted
tokenizer, the name map, and each tensor's type, shape and offset. Later loads of the same file (same path, size
and modification time, same library versions) read the index and map the tensors straight from the file.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

INDEX_FORMAT = 1  # bump when what the index holds, or how it is read, changes


@dataclass(frozen=True, slots=True)
class FileTensor:
    """One tensor of the file as the `gguf` reader gives it: its raw data (blocks for quantized types) as a
    read-only view of the file."""
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray


@dataclass(frozen=True, slots=True)
class GGUFIndex:
    path: Path
    directory: Path  # the index's own folder (index.json, tokenizer/)
    hf_config: dict
    architecture: str
    hf_names: dict[str, str]  # the reader's name map, GGUF name -> Hugging Face name
    tensors: list[dict]  # name, type, dtype, shape, offset: the reader's view of each tensor

    def file_tensors(self) -> list[FileTensor]:
        from gguf import GGMLQuantizationType

        file = np.memmap(self.path, dtype=np.uint8, mode="r")
        tensors = []
        for t in self.tensors:
            dtype, shape = np.dtype(t["dtype"]), tuple(t["shape"])
            size = dtype.itemsize * int(np.prod(shape))
            data = file[t["offset"]:t["offset"] + size].view(dtype).reshape(shape)
            tensors.append(FileTensor(t["name"], GGMLQuantizationType(t["type"]), data))
        return tensors

    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.directory / "tokenizer"))

    def processor(self) -> Any:
        return tensor_processor(self.architecture, self.hf_config)


def tensor_processor(architecture: str, hf_config: dict) -> Any:
    """transformers' processor for the architecture (reverses llama.cpp's Q/K permutation for Llama)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_config)


def read_metadata(path: Path) -> tuple[dict, Any]:
    """(Hugging Face config dict, tokenizer with its chat template) of a GGUF file."""
    index = gguf_index(path)
    return dict(index.hf_config), index.tokenizer()


def dequantized_tensors(path: Path, skip: set[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, fp32 tensor) for each tensor of the file except those named in `skip`."""
    from gguf import dequantize

    index = gguf_index(path)
    processor = index.processor()
    log.info("dequantizing %s (%d tensors kept in block format)", path.name, len(skip))
    for tensor in index.file_tensors():
        if tensor.name in skip:
            continue
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=index.hf_names,
                                   parsed_parameters={"config": index.hf_config, "tensors": {}})
        if result.name in index.hf_names:
            yield index.hf_names[result.name], torch.from_numpy(np.copy(result.weights))


def cache_root() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HOME) / "rag-platform" / "gguf"


def gguf_index(path: Path) -> GGUFIndex:
    """The file's index, read from the cache, or built from the file (and kept there when the cache is
    writable)."""
    path = path.resolve()
    return _index(path, _file_key(path))


@lru_cache(maxsize=8)
def _index(path: Path, key: str) -> GGUFIndex:
    directory = cache_root() / f"{path.stem}-{key}"
    if not (directory / "index.json").is_file():
        try:
            directory.parent.mkdir(parents=True, exist_ok=True)
            _build_index_into(path, directory)
        except OSError as error:
            log.warning("%s: could not keep its GGUF index under %s (%s); this process reads the file's metadata "
                        "in full", path.name, directory.parent, error)
            scratch = Path(tempfile.mkdtemp(prefix="gguf-index-"))
            atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # this process's alone
            _build_index(path, scratch)
            return _read_index(path, scratch)
    return _read_index(path, directory)


def _file_key(path: Path) -> str:
    """Changes with the file (path, size, modification time) and with the libraries whose reading is kept."""
    stat = path.stat()
    identity = [str(path), stat.st_size, stat.st_mtime_ns, version("gguf"), version("transformers"), INDEX_FORMAT]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _build_index_into(path: Path, directory: Path) -> None:
    """Builds next to `directory` and renames into place: a reader never sees half an index, and two processes
    building at once both end with the same one."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        _build_index(path, scratch)
        scratch.chmod(0o755)  # mkdtemp's folder is its owner's alone; the cache may be shared
        try:
            scratch.rename(directory)
        except OSError:
            if not (directory / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _build_index(path: Path, directory: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map, load_gguf_checkpoint, read_field

    log.info("%s: reading its metadata and tokenizer (once; kept in %s)", path.name, directory.parent)
    hf_config = dict(load_gguf_checkpoint(str(path))["config"])
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(directory / "tokenizer"))
    reader = GGUFReader(str(path))
    architecture = str(read_field(reader, "general.architecture")[0])
    # The name map is read off a model skeleton; a meta-device one costs no memory.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    hf_names = get_gguf_hf_weights_map(skeleton, tensor_processor(architecture, hf_config))
    tensors = [{"name": t.name, "type": int(t.tensor_type), "dtype": t.data.dtype.str, "shape": list(t.data.shape),
                "offset": int(t.data_offset)} for t in reader.tensors]
    index = {"format": INDEX_FORMAT, "file": str(path), "hf_config": hf_config, "architecture": architecture,
             "hf_names": hf_names, "tensors": tensors}
    (directory / "index.json").write_text(json.dumps(index))


def _read_index(path: Path, directory: Path) -> GGUFIndex:
    index = json.loads((directory / "index.json").read_text())
    return GGUFIndex(path, directory, index["hf_config"], index["architecture"], index["hf_names"], index["tensors"])
