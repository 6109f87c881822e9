"""Tiny random Llama models written as real GGUF files (the `gguf` package's writer), projections block-quantized.

A small byte-level BPE tokenizer (GPT-2's byte alphabet, a few merges, ChatML specials and template) keeps
loading fast. Q/K rows are permuted the way llama.cpp's
converter permutes them, so the reader has to undo it.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e"]


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def tokens() -> list[str]:
    return SPECIALS + byte_alphabet() + ["".join(m.split()) for m in MERGES]


def llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order: each head's rotary halves interleaved."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape)


def random_k_quant_rows(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Q4_K or Q6_K rows `[rows, cols / 256 * block bytes]` of random super-blocks (the `gguf` package cannot
    quantize to them): random nibbles, bits and sub-block scales, and small positive fp16 `d` (and `dmin`) so the
    weights stay in the range of a trained model's."""
    size = {"Q4_K": 144, "Q6_K": 210}[fmt]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)

    def small(scale: float) -> np.ndarray:
        return (rng.random((len(blocks), 1)) * scale + scale / 8).astype(np.float16).view(np.uint8)

    if fmt == "Q4_K":
        blocks[:, 0:2], blocks[:, 2:4] = small(4e-4), small(4e-4)  # d, dmin
    else:
        blocks[:, 208:210] = small(8e-5)  # d (the int8 sub-block scales go up to 127)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path: Path, fmt: str, seed: int = 0, overrides: dict[str, str] | None = None,
                    hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, architecture: str = "llama") -> Path:
    """A 2-layer Llama (GQA 4/2, tied embeddings) with decoder projections in `fmt` (a GGML type name; per
    projection, e.g. `{"attn_v": "Q8_0"}`, in `overrides`) and everything else in F32. Q4_K's and Q6_K's
    super-blocks need `hidden` and `intermediate` to be multiples of 256; their blocks are random. `architecture`
    "qwen2": Qwen2 instead, with q/k/v biases and no Q/K row permutation."""
    vocab = tokens()
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(LAYERS)
    writer.add_context_length(1024)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(vocab)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(vocab) - 3))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    rng = np.random.default_rng(seed)

    def dense(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * 0.2).astype(np.float32)

    writer.add_tensor("token_embd.weight", dense(len(vocab), hidden))
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    head_dim = hidden // HEADS
    for i in range(LAYERS):
        permute = llama_cpp_permute if architecture == "llama" else (lambda weights, heads: weights)
        projections = {"attn_q": permute(dense(HEADS * head_dim, hidden), HEADS),
                       "attn_k": permute(dense(KV_HEADS * head_dim, hidden), KV_HEADS),
                       "attn_v": dense(KV_HEADS * head_dim, hidden), "attn_output": dense(hidden, hidden),
                       "ffn_gate": dense(intermediate, hidden), "ffn_up": dense(intermediate, hidden),
                       "ffn_down": dense(hidden, intermediate)}
        for name, weights in projections.items():
            qtype = gguf.GGMLQuantizationType[(overrides or {}).get(name, fmt)]
            data = (random_k_quant_rows(qtype.name, *weights.shape, rng) if qtype.name in ("Q4_K", "Q6_K")
                    else gguf.quants.quantize(weights, qtype))
            writer.add_tensor(f"blk.{i}.{name}.weight", data, raw_dtype=qtype)
        if architecture == "qwen2":
            for name, rows in (("attn_q", HEADS * head_dim), ("attn_k", KV_HEADS * head_dim),
                               ("attn_v", KV_HEADS * head_dim)):
                writer.add_tensor(f"blk.{i}.{name}.bias", (0.5 * rng.standard_normal(rows)).astype(np.float32))
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{name}.weight", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
