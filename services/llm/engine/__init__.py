"""The LLM inference engine: paged KV cache with prefix caching, in-flight batching, chunked prefill.

The server builds on exactly these names.
"""

from services.llm.engine.engine import EngineConfig, LLMEngine
from services.llm.engine.outputs import CompletionOutput, EngineStats, RequestOutput, RequestTimings, TokenLogprob
from services.llm.engine.sampling_params import SamplingParams

__all__ = ["CompletionOutput", "EngineConfig", "EngineStats", "LLMEngine", "RequestOutput", "RequestTimings",
           "SamplingParams", "TokenLogprob"]
