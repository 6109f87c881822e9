"""Rerank service settings, read from `RERANK_*` env vars."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings

ScorerKind = Literal["auto", "cross_encoder", "yes_no", "query_likelihood"]


class RerankSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RERANK_", extra="ignore", populate_by_name=True)

    port: int = Field(8002, description="TCP port")
    model: str = Field("", description="cross-encoder or causal-LM directory, or .gguf file "
                                       "(empty: the bundled SmolLM2 GGUF)")
    scorer: ScorerKind = Field("auto", description="auto: sequence-classification model -> cross_encoder, "
                                                   "causal LM or .gguf -> query_likelihood")
    device: str = Field("auto", description="torch device (auto: cuda when available, else cpu; fp16 on cuda)")
    max_length: int = Field(0, ge=0, description="tokens per query + passage pair "
                                                 "(0: 512 for LLM scorers, the model's limit for cross-encoders)")
    max_passages: int = Field(512, ge=1, description="passages per request (413 above)")
    max_batch_size: int = Field(32, ge=1, description="pairs per model batch")
    max_batch_tokens: int = Field(8192, ge=1, description="padded tokens per model batch")
    max_queue: int = Field(4096, ge=1, description="pairs waiting for the model before 429")
