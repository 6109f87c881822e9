"""Settings of the embed service, read from `EMBED_*` env vars (and `API_KEY`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings


class EmbedSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="EMBED_", extra="ignore", populate_by_name=True)

    port: int = Field(8001, description="TCP port")
    model: str = Field("", description="sentence-transformers or HF encoder directory, or hub id "
                                       "(empty: the bundled all-MiniLM-L6-v2)")
    served_model_name: str = Field("", description="model id in /v1/models and responses "
                                                   "(empty: derived from the model)")
    device: str = Field("auto", description="torch device: auto (cuda when present, else cpu), cpu, cuda, cuda:1")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and activations: auto (float16 on cuda; bfloat16 on a CPU with native bf16 "
                            "matmul, AMX or AVX512-BF16; else float32), float32, bfloat16, float16; vectors are "
                            "float32 either way")
    cpu_attention: Literal["auto", "kernel", "torch"] = Field(
        "auto", description="attention of a bf16 model on CPU: auto (the AMX kernel where the CPU and compiler have "
                            "it, else torch's), kernel (required: start fails without it), torch")
    max_batch_size: int = Field(64, gt=0, description="most inputs in one model batch")
    max_batch_tokens: int = Field(16384, gt=0, description="most padded tokens in one model batch")
    max_queue: int = Field(4096, gt=0, description="most inputs waiting for a batch (429 above)")
    max_inputs_per_request: int = Field(2048, gt=0, description="most texts in one request (413 above)")
    query_prefix: str | None = Field(None, description="text put before queries (unset: the model's 'query' "
                                                       "prompt, if it has one)")
    passage_prefix: str | None = Field(None, description="text put before passages (unset: the model's "
                                                         "'passage'/'document' prompt, if it has one)")
