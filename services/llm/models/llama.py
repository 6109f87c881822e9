"""The Llama family: Llama 2/3/3.x, Mistral, TinyLlama, SmolLM/SmolLM2 (MHA, GQA, MQA; tied or untied).

Q/K/V and gate/up projections are fused into one matmul each; `load_weights` fuses the Hugging Face tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from services.llm.config import ModelConfig
from services.llm.layers.activation import SiluAndMul
from services.llm.layers.attention import AttentionMetadata, PagedAttention
from services.llm.layers.norm import RMSNorm
from services.llm.layers.rotary import RotaryEmbedding

# Parameters of projections kept in a GGUF block format: the loader fills them before `load_weights`.
BLOCK_FORMAT_PARAMETERS = ("qweight", "block_scale", "block_min")
# Hugging Face projection name → (fused module, which part of it).
FUSED_PROJECTIONS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                     "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=config.o_bias)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)

    def fused_slices(self) -> list[int]:
        return [self.q_size, self.kv_size, self.kv_size]

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split(self.fused_slices(), dim=-1)
        tokens = hidden.shape[0]
        q = q.reshape(tokens, self.num_heads, self.head_dim)
        k = k.reshape(tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(tokens, self.num_kv_heads, self.head_dim)
        self.rotary(positions, q, k)
        out = self.attn(q, k, v, meta)
        return self.o_proj(out.reshape(tokens, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = SiluAndMul()

    def fused_slices(self) -> list[int]:
        return [self.intermediate_size, self.intermediate_size]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    @torch.no_grad()
    def kv_bounds(self) -> tuple[float, float]:
        """Upper bounds on the magnitude of any key and any value element this layer can write, from its weights
        alone: the normalized input has norm sqrt(hidden) (RMS 1; the norm's weight is folded into the rows), so
        a projection row's output is at most the row's norm times that (Cauchy-Schwarz), plus its bias; rotary
        mixes key dimensions in pairs, at most sqrt(2) times the largest row bound."""
        attn = self.self_attn
        weight, bias = _projection(attn.qkv_proj, self.input_layernorm.weight)
        rows = weight * self.input_layernorm.weight.float()
        bounds = rows.norm(dim=1) * math.sqrt(rows.shape[1]) + bias.abs()
        keys, values = bounds[attn.q_size:attn.q_size + attn.kv_size], bounds[attn.q_size + attn.kv_size:]
        return math.sqrt(2) * float(keys.max()), float(values.max())

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def _projection(linear: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight `[out, in]`, bias `[out]`) in fp32 of a projection as it computes, whatever its storage (packed,
    int8, fp8, GGUF blocks, LoRA-wrapped): read off its outputs for zero and for the identity."""
    eye = torch.eye(like.shape[0], dtype=like.dtype, device=like.device)
    bias = linear(torch.zeros_like(eye[:1])).float()[0]
    return (linear(eye).float() - bias).T, bias


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        # One cos/sin table for all layers: at 128k positions it is tens of MB.
        rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                 config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, rotary) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def kv_bounds(self) -> list[tuple[float, float]]:
        """Per layer, bounds on the magnitude of the keys and values it writes (see the layer's)."""
        return [layer.kv_bounds() for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states `[T, hidden]` for the packed tokens of the step."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies Hugging Face-named tensors in, fusing projections; fails on anything missing or unknown."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            if "rotary_emb.inv_freq" in hf_name:
                continue
            if hf_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            module_path, _, kind = hf_name.rpartition(".")
            parent_path, _, projection = module_path.rpartition(".")
            if projection in FUSED_PROJECTIONS:
                fused, part = FUSED_PROJECTIONS[projection]
                name = f"{parent_path}.{fused}.{kind}"
                if name not in params:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the model")
                owner = self.get_submodule(parent_path)
                sizes = owner.fused_slices()
                start = sum(sizes[:part])
                target = params[name].data[start:start + sizes[part]]
                loaded.add(f"{name}#{part}")
            else:
                name = hf_name
                if name not in params:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has no place in the model")
                target = params[name].data
                loaded.add(name)
            if target.shape != tensor.shape:
                raise ValueError(f"{hf_name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
            target.copy_(tensor)
        missing = [name for name in self._expected_weights() if name not in loaded]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def _expected_weights(self) -> list[str]:
        expected = []
        for name, _ in self.named_parameters():
            module_path, _, kind = name.rpartition(".")
            if kind in BLOCK_FORMAT_PARAMETERS:
                continue
            fused = module_path.rpartition(".")[2]
            if fused == "qkv_proj":
                expected += [f"{name}#{i}" for i in range(3)]
            elif fused == "gate_up_proj":
                expected += [f"{name}#{i}" for i in range(2)]
            else:
                expected.append(name)
        return expected
