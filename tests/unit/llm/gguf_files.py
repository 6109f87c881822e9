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


def write_tiny_gguf(path: Path, fmt: str, seed: int = 0, overrides: dict[str, str] | None = None) -> Path:
    """A 2-layer Llama (GQA 4/2, tied embeddings) with decoder projections in `fmt` (a GGML type name; per
    projection, e.g. `{"attn_v": "Q8_0"}`, in `overrides`) and everything else in F32."""
    vocab = tokens()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(1024)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
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

    writer.add_tensor("token_embd.weight", dense(len(vocab), HIDDEN))
    writer.add_tensor("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    head_dim = HIDDEN // HEADS
    for i in range(LAYERS):
        projections = {"attn_q": llama_cpp_permute(dense(HEADS * head_dim, HIDDEN), HEADS),
                       "attn_k": llama_cpp_permute(dense(KV_HEADS * head_dim, HIDDEN), KV_HEADS),
                       "attn_v": dense(KV_HEADS * head_dim, HIDDEN), "attn_output": dense(HIDDEN, HIDDEN),
                       "ffn_gate": dense(INTERMEDIATE, HIDDEN), "ffn_up": dense(INTERMEDIATE, HIDDEN),
                       "ffn_down": dense(HIDDEN, INTERMEDIATE)}
        for name, weights in projections.items():
            qtype = gguf.GGMLQuantizationType[(overrides or {}).get(name, fmt)]
            writer.add_tensor(f"blk.{i}.{name}.weight", gguf.quants.quantize(weights, qtype), raw_dtype=qtype)
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{name}.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
