"""Ahead-of-time compilation of the engine's Triton kernels for real GPUs, on a machine without one.

`triton.compile` with a `GPUTarget` lowers a kernel to PTX and runs `ptxas` (shipped in the triton wheel) to a
cubin for sm_80 (A100), sm_89 (L40S) and sm_90 (H100/H200); no driver is needed. What gets compiled is exactly
what the engine launches: each launch recorded by `services.llm.kernels.launches.record` is specialized the
way Triton's JIT specializes it (dtypes, 16-byte alignment, integers equal to 1 or divisible by 16, constants,
warps, stages and fp contraction) and deduplicated. Sources of launches:

- `--production`: the compose default Qwen2.5-7B-Instruct (28 query heads, 4 KV heads, head_dim 128) and
  Llama-3-8B (32/8/128), bf16 (the hardware profile's dtype on sm_80+), KV blocks of 16 (the profile's only
  block size), default engine limits (256 sequences, 2048 batched tokens, the model's context). One decoder
  layer is built on the `meta` device (every layer launches the same kernels) and driven, with launches
  recorded dry, through every step shape: decode replayed from a CUDA graph at each captured batch size
  (block tables as wide as `max_model_len`), eager decode of short and long contexts, a full prefill chunk,
  prefix-cache extensions of a few tokens and mixed prefill + decode steps. Each model is recorded once per
  weight format of the decoder projections: bf16, weight-only int8 (`LLM_QUANTIZATION=int8`), the GGUF
  block formats Q8_0, Q4_0, Q4_1, Q4_K and Q6_K (`LLM_GGUF_WEIGHTS=native`), and fp8 (`LLM_QUANTIZATION=fp8` with
  `LLM_KV_CACHE_DTYPE=fp8`: the fp8 GEMM, and the cache kernels on an e4m3 pool), so the quantized GEMMs are
  compiled for every step shape the engine runs them at.
- `--launches FILE`: launches recorded elsewhere (the tests record the whole engine run through the kernels
  under Triton's interpreter and compile those).

A launch that passes an fp8 (e4m3) tensor needs sm_89 or newer (Triton has no e4m3 below Ada): it is compiled only
for those architectures, and the report lists what it skipped below them. Per kernel specialization and
architecture the report gives registers per thread, spilled bytes, stack frame,
shared memory (dynamic + static) against the architecture's per-block limit, and the occupancy those allow
(resident warps per SM over the maximum). `--check` exits 1 on any compile error or shared memory over the
limit.

    python bench/kernels_compile.py          # production shapes -> bench/results/kernels-compile-<date>.json
    python bench/kernels_compile.py --check --production --out report.json
    python bench/kernels_compile.py --check --launches launches.json --out report.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime as dt
import functools
import importlib
import io
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.report import RESULTS, device_name, git_commit, library_versions, print_table  # noqa: E402
from services.llm.kernels.launches import Launch  # noqa: E402


@dataclass(frozen=True, slots=True)
class Arch:
    capability: int
    gpus: str
    max_shared_per_block: int  # bytes a block may opt in to
    shared_per_sm: int
    max_warps_per_sm: int
    max_blocks_per_sm: int
    registers_per_sm: int = 65536


# From NVIDIA's CUDA C++ Programming Guide, "Technical Specifications per Compute Capability".
ARCHS = {
    80: Arch(80, "A100", max_shared_per_block=163 * 1024, shared_per_sm=164 * 1024, max_warps_per_sm=64,
             max_blocks_per_sm=32),
    89: Arch(89, "L40S, L4, RTX 4090", max_shared_per_block=99 * 1024, shared_per_sm=100 * 1024,
             max_warps_per_sm=48, max_blocks_per_sm=24),
    90: Arch(90, "H100, H200", max_shared_per_block=227 * 1024, shared_per_sm=228 * 1024, max_warps_per_sm=64,
             max_blocks_per_sm=32),
}

# The config.json fields the engine reads, as published with each model.
PRODUCTION_MODELS: dict[str, dict[str, Any]] = {
    "Qwen2.5-7B-Instruct": {"model_type": "qwen2", "vocab_size": 152064, "hidden_size": 3584,
                            "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
                            "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                            "max_position_embeddings": 32768, "tie_word_embeddings": False},
    "Llama-3-8B": {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
                   "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                   "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
                   "tie_word_embeddings": False},
}
PRODUCTION_DTYPE = torch.bfloat16
# the decoder projections' weight formats
PRODUCTION_WEIGHTS = ("bf16", "int8", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "fp8")
FP8_MIN_CAPABILITY = 89  # fp8 (e4m3) tensors: Ada and Hopper
PRODUCTION_BLOCK_SIZES = (16,)  # what `hardware.detect_hardware` chooses on every GPU
MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS = 256, 2048  # the engine's defaults


# ---- the launches of a production-sized model, recorded dry on the meta device ----------------------------

def _quantize_on_meta(model: torch.nn.Module, weights: str) -> None:
    """Swaps the decoder projections of a `meta` model for the layers of a quantized weight format."""
    from torch import nn

    from services.llm.layers.fp8_linear import quantize_linears_fp8
    from services.llm.layers.gguf_linear import GGUFLinear
    from services.llm.layers.int8_linear import quantize_linears_int8

    if weights == "int8":
        quantize_linears_int8(model)
        return
    if weights == "fp8":
        quantize_linears_fp8(model)
        return
    for layer in model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name, dense in list(owner.named_children()):
                if isinstance(dense, nn.Linear):
                    rows, cols = dense.out_features, dense.in_features
                    bytes_per_weight = 1 if weights in ("Q8_0", "Q6_K") else 0.5
                    q = torch.empty(rows, int(cols * bytes_per_weight), device="meta",
                                    dtype=torch.int8 if bytes_per_weight == 1 else torch.uint8)
                    scale = torch.empty(rows, cols // (16 if weights == "Q6_K" else 32), device="meta",
                                        dtype=torch.float32 if weights.endswith("_K") else torch.float16)
                    minimum = torch.empty_like(scale) if weights in ("Q4_1", "Q4_K") else None
                    bias = None if dense.bias is None else dense.bias.data
                    setattr(owner, name, GGUFLinear(weights, q, scale, minimum, bias, PRODUCTION_DTYPE))


def production_launches(hf_config: dict[str, Any], block_size: int, weights: str = "bf16") -> list[Launch]:
    from services.llm.config import ModelConfig
    from services.llm.engine.engine import MAX_GRAPH_BATCH
    from services.llm.kernels import launches
    from services.llm.kernels.cuda_graphs import default_capture_sizes
    from services.llm.kernels.dispatch import triton_everywhere
    from services.llm.kernels.kv_store import FP8_KV_DTYPE
    from services.llm.layers.attention import AttentionMetadata
    from services.llm.loader import build_on_device

    config = ModelConfig.from_hf({**hf_config, "num_hidden_layers": 1})
    device = torch.device("meta")
    model = build_on_device(config, device, PRODUCTION_DTYPE)
    if weights != "bf16":
        _quantize_on_meta(model, weights)
    kv_dtype = FP8_KV_DTYPE if weights == "fp8" else PRODUCTION_DTYPE  # fp8 weights come with an fp8 KV cache
    max_model_len = config.max_position_embeddings
    max_blocks = -(-max_model_len // block_size)
    cache_shape = (max_blocks * 4, block_size, config.num_kv_heads, config.head_dim)
    for layer in model.attention_layers():
        layer.bind_cache(torch.empty(cache_shape, dtype=kv_dtype, device=device),
                         torch.empty(cache_shape, dtype=kv_dtype, device=device))

    def step(q_lens: list[int], width: int) -> None:
        tokens, batch = sum(q_lens), len(q_lens)
        decode_only = tokens == batch
        meta = AttentionMetadata(
            slot_mapping=torch.empty(tokens, dtype=torch.long, device=device),
            block_tables=torch.empty(batch, width, dtype=torch.int32, device=device),
            cu_seqlens_q=torch.empty(batch + 1, dtype=torch.int32, device=device),
            seq_lens=torch.empty(batch, dtype=torch.int32, device=device),
            decode_only=decode_only, max_query_len=max(q_lens))
        model(torch.empty(tokens, dtype=torch.long, device=device), torch.empty(tokens, dtype=torch.long,
                                                                                  device=device), meta)

    with triton_everywhere(), launches.record(dry=True) as recorded, torch.inference_mode():
        for batch in default_capture_sizes(min(MAX_NUM_SEQS, MAX_GRAPH_BATCH)):
            step([1] * batch, max_blocks)  # decode replayed from a graph: tables as wide as max_model_len
        for batch in (1, 3, 8, 64, 256):
            for context in (16, 512, max_model_len):
                step([1] * batch, -(-context // block_size))  # eager decode (graphs off, or past the largest)
        step([MAX_NUM_BATCHED_TOKENS], max_blocks)  # a full prefill chunk
        for q_len in (2, 3, 5, 9, 100):
            step([q_len, 1, 1], max_blocks)  # prefix-cache extension mixed with decodes
        step([MAX_NUM_BATCHED_TOKENS - 255] + [1] * 255, max_blocks)  # chunked prefill + a full decode batch
    return recorded


# ---- specialization as Triton's JIT does it, compilation, resource usage ---------------------------------

def min_capability(launch: Launch) -> int:
    """The oldest architecture a launch can compile for: sm_89 when it passes an fp8 tensor, else any."""
    fp8 = any(isinstance(a, tuple) and a[0] == "tensor" and a[1].startswith("float8") for a in launch.args)
    return FP8_MIN_CAPABILITY if fp8 else 0


def _kernel(name: str) -> Any:
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def _stand_in(arg: Any) -> Any:
    """A meta tensor with the recorded dtype and alignment, or the recorded scalar."""
    if isinstance(arg, tuple) and arg and arg[0] == "tensor":
        _, dtype, aligned = arg
        base = torch.empty(32, dtype=getattr(torch, dtype), device="meta")
        return base if aligned else base[1:]
    return arg


@dataclass(frozen=True, slots=True)
class Specialization:
    kernel: str
    signature: dict[str, str]
    constexprs: dict[tuple[int, ...], Any]
    attrs: dict[tuple[int, ...], Any]
    options: dict[str, Any]

    @property
    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, sorted(map(str, self.constexprs.items())),
                           sorted(map(str, self.attrs.items())), sorted(self.options.items())], default=str)

    def describe(self) -> dict[str, Any]:
        names = list(self.signature)
        constants = {names[path[0]]: value for path, value in self.constexprs.items()}
        aligned = sorted(names[path[0]] for path, attr in self.attrs.items() if attr)
        return {"constants": {k: v for k, v in constants.items() if self.signature[k] == "constexpr"},
                "signature": {k: v for k, v in self.signature.items() if v != "constexpr"},
                "divisible_by_16": aligned, **self.options}


@functools.cache
def _binder(kernel: str, capability: int) -> tuple[Any, Any, Any]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel(kernel)
    backend = make_backend(GPUTarget("cuda", capability, 32))
    return fn, backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialize(launch: Launch, capability: int) -> Specialization:
    fn, backend, binder = _binder(launch.kernel, capability)
    kwargs = dict(launch.kwargs)
    bound, specialization, options = binder(*(_stand_in(a) for a in launch.args), **kwargs)
    _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    chosen = {k: kwargs[k] for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    return Specialization(launch.kernel, signature, constexprs, attrs, chosen)


def occupancy(arch: Arch, registers: int, shared: int, num_warps: int) -> tuple[int, float]:
    """(resident blocks per SM, resident warps / max warps) for a kernel of `num_warps` warps."""
    per_warp = math.ceil(registers * 32 / 256) * 256  # registers are allocated per warp in units of 256
    by_registers = (arch.registers_per_sm // per_warp) // num_warps if per_warp else arch.max_blocks_per_sm
    by_warps = arch.max_warps_per_sm // num_warps
    # Each block also reserves 1 KB of shared memory for the system on sm_80 and later.
    by_shared = arch.shared_per_sm // (math.ceil(shared / 128) * 128 + 1024)
    blocks = min(by_registers, by_warps, by_shared, arch.max_blocks_per_sm)
    return blocks, blocks * num_warps / arch.max_warps_per_sm


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_shared": re.compile(r"(\d+) bytes smem"),
}


def compile_one(spec: Specialization, arch: Arch) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row: dict[str, Any] = {"kernel": spec.kernel.split(":")[1].strip("_"), "arch": f"sm_{arch.capability}",
                           **spec.describe()}
    log = io.StringIO()
    started = time.perf_counter()
    try:
        # ptxas -v reports registers and spills; the log is printed only when ptxas runs, so never reuse the cache.
        with triton.knobs.nvidia.scope(), triton.knobs.compilation.scope(), contextlib.redirect_stdout(log):
            triton.knobs.nvidia.dump_ptxas_log = True
            triton.knobs.compilation.always_compile = True
            compiled = triton.compile(ASTSource(_kernel(spec.kernel), spec.signature, spec.constexprs, spec.attrs),
                                      target=GPUTarget("cuda", arch.capability, 32), options=spec.options)
    except Exception as exc:  # the report lists every failure instead of stopping at the first
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    found = {name: int(m.group(1)) if (m := pattern.search(log.getvalue())) else 0 for name, pattern in _PTXAS.items()}
    shared = compiled.metadata.shared + found.pop("static_shared")
    num_warps = compiled.metadata.num_warps
    blocks, occ = occupancy(arch, found["registers"], shared, num_warps)
    return {**row, **found, "shared_bytes": shared, "shared_limit": arch.max_shared_per_block,
            "num_warps": num_warps, "num_stages": compiled.metadata.num_stages, "blocks_per_sm": blocks,
            "occupancy": round(occ, 3), "has_ptx": bool(compiled.asm.get("ptx")),
            "cubin_bytes": len(compiled.asm["cubin"]), "compile_s": round(time.perf_counter() - started, 2),
            "error": None if shared <= arch.max_shared_per_block else
            f"shared memory {shared} B above the sm_{arch.capability} limit {arch.max_shared_per_block} B"}


def _compile_job(job: tuple[Specialization, int]) -> dict[str, Any]:
    spec, capability = job
    return compile_one(spec, ARCHS[capability])


def compile_all(sources: dict[str, list[Launch]], archs: Iterable[int], jobs: int = 1,
                skipped: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Every distinct specialization of every source, compiled for each architecture it can run on (`jobs`
    processes); `skipped` counts, per "kernel sm_XX", the launches left out for an architecture too old."""
    work_items: dict[tuple[int, str], tuple[Specialization, list[str]]] = {}
    for source, recorded in sources.items():
        for launch in recorded:
            for capability in archs:
                if capability < min_capability(launch):
                    if skipped is not None:
                        name = f"{launch.kernel.split(':')[1].strip('_')} sm_{capability}"
                        skipped[name] = skipped.get(name, 0) + 1
                    continue
                spec = specialize(launch, capability)
                _, used_by = work_items.setdefault((capability, spec.key), (spec, []))
                if source not in used_by:
                    used_by.append(source)
    work = sorted(work_items.items(), key=lambda j: (j[0][0], j[1][0].kernel))
    todo = [(spec, capability) for (capability, _), (spec, _) in work]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(tqdm(pool.map(_compile_job, todo), total=len(todo), desc="compiling", unit="kernel"))
    return [{**row, "sources": used_by} for row, (_, (_, used_by)) in zip(results, work, strict=True)]


# ---- the report --------------------------------------------------------------------------------------------

def summary_table(rows: list[dict[str, Any]]) -> list[list[object]]:
    """One line per kernel and architecture, worst case over its specializations."""
    table = []
    for kernel in sorted({r["kernel"] for r in rows}):
        for arch in sorted({r["arch"] for r in rows}):
            mine = [r for r in rows if r["kernel"] == kernel and r["arch"] == arch and not r["error"]]
            failed = sum(1 for r in rows if r["kernel"] == kernel and r["arch"] == arch and r["error"])
            if not mine:
                table.append([kernel, arch, 0, "-", "-", "-", "-", failed])
                continue
            table.append([kernel, arch, len(mine), max(r["registers"] for r in mine),
                          max(r["spill_stores"] + r["spill_loads"] for r in mine),
                          f"{max(r['shared_bytes'] for r in mine) / 1024:.1f}",
                          f"{min(r['occupancy'] for r in mine):.0%}-{max(r['occupancy'] for r in mine):.0%}",
                          failed])
    return table


TABLE_HEADER = ["kernel", "arch", "specializations", "max registers", "max spill bytes", "max shared KiB",
                "occupancy", "failures"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--production", action="store_true",
                        help="compile the production models' launches (the default when no --launches is given)")
    parser.add_argument("--launches", type=Path, help="a JSON list of recorded launches to compile")
    parser.add_argument("--archs", default="80,89,90", help="compute capabilities, comma-separated")
    parser.add_argument("--out", type=Path, help="report path (default bench/results/kernels-compile-<date>.json)")
    parser.add_argument("--check", action="store_true", help="exit 1 on any compile error or shared-memory overflow")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="compiler processes (default: one per CPU this process may use)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: ahead-of-time compilation needs Triton's compiler, not its interpreter")
    archs = [int(a) for a in args.archs.split(",")]

    sources: dict[str, list[Launch]] = {}
    if args.launches:
        sources[args.launches.name] = [Launch.from_json(item) for item in json.loads(args.launches.read_text())]
    if args.production or not args.launches:
        for name, hf_config in PRODUCTION_MODELS.items():
            for block_size in PRODUCTION_BLOCK_SIZES:
                for weights in PRODUCTION_WEIGHTS:
                    sources[f"{name} {weights} block {block_size}"] = production_launches(hf_config, block_size,
                                                                                          weights)
    started = time.perf_counter()
    skipped: dict[str, int] = {}
    rows = compile_all(sources, archs, args.jobs, skipped)
    failures = [r for r in rows if r["error"]]

    print_table("Triton kernels compiled ahead of time (worst case over each kernel's specializations)",
                TABLE_HEADER, summary_table(rows))
    for row in failures:
        print(f"FAILED {row['kernel']} {row['arch']}: {row['error'][:400]}", file=sys.stderr)
    import triton

    record = {
        "name": "kernels-compile",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": f"none: compiled ahead of time on {device_name()} for "
                  + ", ".join(f"sm_{a} ({ARCHS[a].gpus})" for a in archs),
        "libraries": library_versions(),
        "workload": {"sources": {name: len(recorded) for name, recorded in sources.items()},
                     "production_dtype": str(PRODUCTION_DTYPE).removeprefix("torch."),
                     "production_block_sizes": PRODUCTION_BLOCK_SIZES,
                     "production_weights": PRODUCTION_WEIGHTS,
                     "engine_limits": {"max_num_seqs": MAX_NUM_SEQS,
                                       "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS}},
        "ours": {"specializations_compiled": len(rows), "failures": len(failures),
                 "skipped_fp8_below_sm89": skipped,
                 "seconds": round(time.perf_counter() - started, 1), "triton": triton.__version__},
        "peer": None,
        "hardware_limit": {f"sm_{a}": {"max_shared_per_block": ARCHS[a].max_shared_per_block,
                                       "max_warps_per_sm": ARCHS[a].max_warps_per_sm} for a in archs},
        "summary": [dict(zip(TABLE_HEADER, line, strict=True)) for line in summary_table(rows)],
        "kernels": rows,
    }
    out = args.out or RESULTS / f"kernels-compile-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    if skipped:
        print(f"fp8 launches not compiled for architectures below sm_{FP8_MIN_CAPABILITY}: {skipped}")
    print(f"\n{len(rows)} compilations, {len(failures)} failed; wrote {out}")
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
