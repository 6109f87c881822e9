"""GGUF projections kept in their blocks on CUDA (`LLM_GGUF_WEIGHTS=auto`) give the greedy tokens of the same file
dequantized at load, through the compiled block GEMMs, for every block format the engine runs natively."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="needs compiled Triton, not the interpreter"),
]


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q4_K_M"])
def test_gguf_blocks_on_gpu_give_the_dequantized_tokens(tmp_path: Path, fmt: str) -> None:
    """`LLM_GGUF_WEIGHTS=auto` keeps a GGUF's projections in their blocks on CUDA; fp32 greedy tokens equal the
    dequantize-at-load engine's."""
    import torch

    from services.llm.engine import EngineConfig, LLMEngine, SamplingParams
    from services.llm.layers.gguf_linear import block_format_counts
    from tests.unit.llm.gguf_files import write_tiny_gguf

    size = {"hidden": 256, "intermediate": 256} if "_K" in fmt else {}
    if fmt == "Q4_K_M":  # llama.cpp's mix: Q4_K, with v and down projections in Q6_K
        path = write_tiny_gguf(tmp_path / "tiny-Q4_K_M.gguf", "Q4_K", overrides={"attn_v": "Q6_K", "ffn_down": "Q6_K"},
                               **size)
        blocks = {"Q4_K": 6, "Q6_K": 4}  # per layer: q+k, o, gate+up; v, down
    else:
        path = write_tiny_gguf(tmp_path / f"tiny-{fmt}.gguf", fmt, **size)
        blocks = {fmt: 8}
    prompts = [torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 17, 40)]
    params = SamplingParams(max_tokens=12, min_tokens=12, temperature=0.0)
    tokens = {}
    for weights in ("auto", "dequantize"):
        # A small pool (other test files run beside this one); eager decode: the block kernels are what is tested.
        engine = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="float32", gguf_weights=weights,
                                        num_kv_blocks=256, enable_cuda_graphs=False))
        counts = block_format_counts(engine.runner.model)
        assert counts == (blocks if weights == "auto" else {})
        tokens[weights] = [o.outputs[0].token_ids for o in engine.generate(prompts, params, use_tqdm=False)]
    assert tokens["auto"] == tokens["dequantize"]
