"""LLM service settings, read from `LLM_*` env vars (plus `API_KEY`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings


class LLMSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LLM_", extra="ignore", populate_by_name=True)
    caps_gpu_allocator = False  # the engine sizes its KV-cache pool to gpu_memory_utilization itself

    port: int = Field(8000, description="TCP port")
    served_model_name: str = Field("", description="model id in the API (empty: the model file or directory name)")
    device: str = Field("auto", description="cuda, cpu, or auto (cuda when available)")
    dtype: str = Field("auto", description="float16, bfloat16, float32, or auto")
    block_size: int | None = Field(None, description="tokens per KV-cache block (empty: the hardware profile's)")
    kv_cache_gib: float = Field(1.0, description="KV-cache size in GiB on CPU")
    gpu_memory_utilization: float = Field(
        0.85, description="share of the GPU's memory for weights, activations and the KV pool (which gets what is "
                          "left); services sharing a GPU keep the sum <= 0.95")
    max_num_seqs: int = Field(256, description="most sequences running in one engine step")
    max_num_batched_tokens: int = Field(2048, description="most tokens in one engine step")
    long_prefill_token_threshold: int = Field(512, ge=0, description="most tokens of one prompt per engine step "
                                              "while other requests run, so their decodes keep flowing (0: no cap)")
    max_prefill_tokens_per_step: int = Field(
        0, ge=0, description="most prompt tokens of all requests together in one engine step while several requests "
                             "share the engine (0: no cap beyond max_num_batched_tokens). A cap such as 512 "
                             "prefills a burst of new prompts a few per step: the first of them stream sooner, "
                             "but the running streams pause for more prefill steps, and throughput drops")
    max_model_len: int | None = Field(None, description="context length (empty: the model's)")
    enable_prefix_caching: bool = Field(True, description="reuse KV blocks of shared prompt prefixes")
    max_waiting: int = Field(1024, description="requests allowed to wait beyond max_num_seqs; more get 429")
    request_timeout: float = Field(600.0, description="seconds before a request is aborted")
    shutdown_timeout: float = Field(20.0, description="seconds running requests get to finish on shutdown")
    seed: int = Field(0, description="engine seed for requests without their own")
    cuda_graphs: bool = Field(True, description="replay decode steps from CUDA graphs where the GPU allows")
    enforce_eager: bool = Field(False, description="run every step eagerly (turns CUDA graphs off)")
    speculative_method: str = Field("off", description="speculative decoding: off, ngram (prompt lookup: drafts "
                                    "copied from earlier in the prompt), or draft (a smaller model with the same "
                                    "tokenizer, LLM_SPECULATIVE_DRAFT_MODEL)")
    speculative_num_tokens: int = Field(4, ge=1, description="most draft tokens per sequence per step")
    speculative_ngram_min: int = Field(2, ge=1, description="prompt lookup: shortest suffix matched")
    speculative_ngram_max: int = Field(4, ge=1, description="prompt lookup: longest suffix matched")
    speculative_draft_model: str = Field("", description="draft model directory or .gguf (method draft)")
    speculative_max_batch: int = Field(0, ge=0, description="no drafts while more sequences than this run, where "
                                       "verification costs more than it saves (0: no limit)")
    lora_modules: str = Field("", description="LoRA adapters (PEFT directories) to load at start, as "
                              "name=path,name=path; a request picks one with its 'model' field")
    max_loras: int = Field(0, ge=0, description="LoRA adapter slots, loaded at start or through "
                           "/v1/load_lora_adapter (0: as many as LLM_LORA_MODULES names, at least 4, or LoRA off "
                           "when it names none)")
    max_lora_rank: int = Field(16, ge=1, description="largest LoRA rank an adapter may have")
    quantization: str = Field("none", description="weight format of the decoder layers' projections: none (the "
                              "dtype's), int8 (weight-only, per output channel; on CPU a faster decode in bf16) or "
                              "fp8 (e4m3, per output channel; a Triton GEMM on sm_89+ GPUs, memory only on CPU)")
    kv_cache_dtype: str = Field("auto", description="KV cache element type: auto (the model's dtype) or fp8 (e4m3, "
                                "alias fp8_e4m3: one byte per element, about twice the tokens of a bf16 cache; "
                                "sm_89+ GPUs or CPU)")
    cpu_weight_packing: bool = Field(True, description="on a CPU with native bf16 (AMX, AVX512-BF16), bf16 linear "
                                     "weights are reordered once at load into oneDNN's packed layout: the same "
                                     "outputs, faster steps (the LM head of a tied model gets its own copy)")
    gguf_weights: str = Field("auto", description="a .gguf model's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K decoder projections: "
                              "native (kept in their blocks, dequantized tile by tile inside the matmul), dequantize "
                              "(widened to the dtype at load), or auto (native on CUDA, where the Triton kernel "
                              "reads them; dequantize on CPU, where widening per matmul is slower than the dtype's "
                              "GEMM)")
    cpu_compile: bool = Field(True, description="on CPU in bf16, RMSNorm, rotary and SiLU-and-mul of prefill-sized "
                              "steps (128 tokens and more) are compiled by torch.compile (inductor) at start-up: "
                              "about a fifth less CPU per prefill; needs a C++ compiler (without one they stay "
                              "eager, with a warning)")
    cpu_attention: str = Field("auto", description="CPU attention: kernel (C kernels that read the paged KV cache "
                                "in place, for decodes, and for bf16 prefills on AVX512-BF16; built with the "
                                "system C compiler at first start; fails without one), torch (gathers each step's "
                                "blocks, then SDPA), or auto (the kernels where they build, else torch with a "
                                "warning)")
    cpu_elementwise: str = Field("auto", description="CPU steps under 128 tokens (decodes): RMSNorm with its "
                                  "residual add, rotary and SiLU-and-mul as one C call each, bit for bit the eager "
                                  "torch ops; kernel (built with the system C compiler at first start; fails "
                                  "without one), torch (the eager ops), or auto (the kernel where it builds, else "
                                  "torch with a warning)")
    cpu_matmul: str = Field("auto", description="CPU steps of up to 32 tokens (decodes) on cores with AMX or "
                            "AVX512-BF16: the packed bf16 linear layers run in a C kernel that reads oneDNN's packed "
                            "weights in place and streams them once, bit for bit oneDNN's outputs (checked per layer "
                            "at start); kernel (built with the system C compiler at first start; fails without one "
                            "or on a CPU with neither), torch (oneDNN), or auto (the kernel where it builds and runs, "
                            "else oneDNN with a warning)")
    cpu_adaptive_threads: bool = Field(True, description="on CPU, about once a second torch's thread count is set "
                                       "to the cores other processes leave free (at least one): a thread stalled by "
                                       "another process stalls the whole team at every layer. Off, or with "
                                       "OMP_NUM_THREADS set, the count stays fixed")
    cpu_front_end_core_tokens: int = Field(4, ge=0, description="on CPU, with adaptive threads: steps of up to this "
                                           "many tokens (a decode of up to 4 requests; speculative drafts count "
                                           "where proposed) run on one thread fewer than the team, leaving a core "
                                           "to the server's own request handling and streaming, which otherwise "
                                           "stalls the team; such small steps gain little from the extra thread. "
                                           "0: every step uses the whole team")
    tool_call_parser: str = Field("auto", description="how tool calls are written: hermes (Qwen2.5 <tool_call>), "
                                  "llama3_json, template (learned from the chat template), or auto (from the "
                                  "model's chat template)")
