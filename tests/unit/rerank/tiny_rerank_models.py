"""Tiny random-weight models for rerank tests, built in a temporary directory (nothing from a model hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    LlamaConfig,
    LlamaForCausalLM,
)

from common.model_files import bundled_llm

WORD_LIST = ("the a an of in on is are was what which who how why where does do cat cats dog dogs sat mat sun "
             "hot star stars planet earth moon water boils at degrees paris capital france city river bank "
             "money python language code snake reptile rain weather cold winter summer tree trees grow")
WORDS = WORD_LIST.split()
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789"


def build_cross_encoder(directory: Path, num_labels: int = 1, max_positions: int = 64) -> Path:
    """A BertForSequenceClassification with random weights and a small WordPiece vocabulary."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *LETTERS, *(f"##{c}" for c in LETTERS),
             ".", ",", "?", "!", "'"]
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(dict.fromkeys(vocab)) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file), model_max_length=max_positions)
    config = BertConfig(vocab_size=len(dict.fromkeys(vocab)), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
                        num_labels=num_labels)
    torch.manual_seed(num_labels)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_causal_lm(directory: Path, max_positions: int = 256) -> Path:
    """A 2-layer Llama with random weights over the bundled SmolLM2 tokenizer (real BPE, chat template)."""
    directory.mkdir(parents=True, exist_ok=True)
    gguf = bundled_llm()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
