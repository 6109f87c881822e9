"""Model shapes: what sizing needs to know about a decoder-only transformer, from a table, a config dir or a GGUF."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

# Bytes per value of each precision name the tool accepts (int4 is weight-only: 4-bit weights, 16-bit compute).
PRECISION_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int4": 0.5}


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def layer_params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o and k, v
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down
        return attention + mlp + 2 * self.hidden  # two RMSNorms

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * self.layer_params + embeddings + self.hidden

    @property
    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token: every layer and the LM head (not the embedding lookup)."""
        return self.layers * self.layer_params + self.vocab * self.hidden

    def weight_bytes(self, precision: str) -> float:
        return self.params * PRECISION_BYTES[precision]

    def kv_bytes_per_token(self, precision: str) -> float:
        """2 (K and V) × layers × KV heads × head dim × bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * PRECISION_BYTES[precision]


def _shape(name: str, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
           head_dim: int | None = None, tied: bool = False) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, kv_heads, head_dim or hidden // heads, intermediate, vocab, tied)


# Common shapes, from each model's published config.json.
BUILTIN_MODELS: dict[str, ModelShape] = {shape.name: shape for shape in (
    _shape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
    _shape("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
    _shape("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
    _shape("llama-3-8b", 32, 4096, 32, 8, 14336, 128256),
    _shape("llama-3-70b", 80, 8192, 64, 8, 28672, 128256),
    _shape("llama-3.1-405b", 126, 16384, 128, 8, 53248, 128256),
    _shape("mistral-7b", 32, 4096, 32, 8, 14336, 32768),
    _shape("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064),
    _shape("qwen2.5-72b", 80, 8192, 64, 8, 29568, 152064),
    _shape("smollm2-135m", 30, 576, 9, 3, 1536, 49152, tied=True),
)}
# The names people use for the same shapes (the GTC sizing talk says "Llama-7B" and "Llama-70B").
ALIASES = {"llama-7b": "llama-2-7b", "llama-13b": "llama-2-13b", "llama-70b": "llama-2-70b",
           "llama-3.1-8b": "llama-3-8b", "llama-3.1-70b": "llama-3-70b", "qwen2.5-7b-instruct": "qwen2.5-7b",
           "smollm2-135m-instruct": "smollm2-135m", "default": "smollm2-135m"}


def from_hf_config(config: dict, name: str) -> ModelShape:
    if any(key in config for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ValueError(f"{name}: mixture-of-experts models are not modelled (dense decoders only)")
    heads = config["num_attention_heads"]
    return ModelShape(
        name=name,
        layers=config["num_hidden_layers"],
        hidden=config["hidden_size"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_metadata(path: Path) -> tuple[dict[str, object], list[str]]:
    """A GGUF file's key/values (an array becomes its length) and tensor names, without reading the weights."""
    with path.open("rb") as f:
        def unpack(fmt: str) -> object:
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(unpack("Q")).decode("utf-8", "replace")

        def value(kind: int) -> object:
            if kind == 8:
                return string()
            if kind == 9:
                item, count = unpack("I"), unpack("Q")
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                else:
                    for _ in range(count):
                        value(item)
                return count
            return unpack(_GGUF_SCALARS[kind])

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        unpack("I")  # version
        tensors, entries = unpack("Q"), unpack("Q")
        metadata = {}
        for _ in range(entries):
            key = string()
            metadata[key] = value(unpack("I"))
        names = []
        for _ in range(tensors):
            names.append(string())
            f.seek(8 * unpack("I") + 4 + 8, 1)  # dims, type, offset
    return metadata, names


def from_gguf(path: Path) -> ModelShape:
    metadata, tensors = read_gguf_metadata(path)
    arch = metadata["general.architecture"]

    def field(key: str, default: object = None) -> int:
        found = metadata.get(f"{arch}.{key}", default)
        if found is None:
            raise ValueError(f"{path.name}: GGUF metadata has no {arch}.{key}")
        return int(found)

    heads, hidden = field("attention.head_count"), field("embedding_length")
    return ModelShape(name=path.stem, layers=field("block_count"), hidden=hidden, heads=heads,
                      kv_heads=field("attention.head_count_kv", heads),
                      head_dim=field("attention.key_length", hidden // heads),
                      intermediate=field("feed_forward_length"),
                      vocab=field("vocab_size", metadata.get("tokenizer.ggml.tokens")),
                      tied_embeddings="output.weight" not in tensors)


def load_shape(spec: str) -> ModelShape:
    """A built-in name (see BUILTIN_MODELS), a directory with config.json, a config.json, or a .gguf file."""
    key = spec.lower()
    if key in BUILTIN_MODELS or key in ALIASES:
        return BUILTIN_MODELS[ALIASES.get(key, key)]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".gguf" and path.is_file():
        return from_gguf(path)
    if path.is_file():
        return from_hf_config(json.loads(path.read_text()), path.parent.name)
    known = ", ".join(sorted([*BUILTIN_MODELS, *ALIASES]))
    raise ValueError(f"unknown model {spec!r}: give a config directory, a .gguf file or one of: {known}")
