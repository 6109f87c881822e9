"""A GGUF file read the way transformers' GGUF reader reads it, one tensor at a time.

The configuration and tokenizer come from transformers (`load_gguf_checkpoint` without tensors, and the
tokenizer's GGUF support). The tensors are dequantized here, lazily, with the same steps as the reader's own loop
(`gguf.dequantize`, the architecture's tensor processor, which undoes llama.cpp's Q/K row permutation for
Llama, and the reader's GGUF -> Hugging Face name map): the loader copies each into the model as it comes, so
the host holds one fp32 tensor at a time instead of the whole model, and tensors kept in their block format
(`gguf_blocks.py`) are never dequantized at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def read_metadata(path: Path) -> tuple[dict, Any]:
    """(Hugging Face config dict, tokenizer with its chat template) of a GGUF file."""
    from transformers import AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    hf_config = dict(load_gguf_checkpoint(str(path))["config"])
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return hf_config, tokenizer


def tensor_processor(reader: Any, hf_config: dict) -> Any:
    """transformers' processor for the file's architecture (reverses llama.cpp's Q/K permutation for Llama)."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, read_field

    architecture = read_field(reader, "general.architecture")[0]
    return TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=hf_config)


def dequantized_tensors(path: Path, hf_config: dict, skip: set[str] = frozenset()
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, fp32 tensor) for each tensor of the file except those named in `skip`."""
    from gguf import GGUFReader, dequantize
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    reader = GGUFReader(str(path))
    processor = tensor_processor(reader, hf_config)
    # The name map is read off a model skeleton; a meta-device one costs no memory.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf_config))
    names = get_gguf_hf_weights_map(skeleton, processor)
    log.info("dequantizing %s (%d tensors kept in block format)", path.name, len(skip))
    for tensor in reader.tensors:
        if tensor.name in skip:
            continue
        result = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name,
                                   tensor_key_mapping=names, parsed_parameters={"config": hf_config, "tensors": {}})
        if result.name in names:
            yield names[result.name], torch.from_numpy(np.copy(result.weights))
