"""LLM kernels: time, achieved memory bandwidth and the peers they replace, on one device.

Every kernel family is timed on realistic shapes (Llama-3-8B-like: 32 query heads, 8 KV heads, head dim 128,
bf16, KV blocks of 16). Bandwidth is bytes the kernel must move (read + write, once) over its time, set
against the device's measured copy bandwidth (a large `tensor.copy_`). Peers, in the same run:
- decode attention: `scaled_dot_product_attention` with the flash and memory-efficient backends on the same
  K/V laid out dense `[B, Hkv, L, D]` (GQA via `enable_gqa`, else expanded heads; whichever runs);
- prefill attention: the same SDPA backends, causal, on dense `[B, Hq, L, D]`;
- KV store, RMSNorm, rotary, SiLU-and-mul: the torch references (what runs without Triton);
- weight-only GEMMs (int8 per channel, GGUF Q8_0/Q4_0/Q4_1 blocks) on Llama-3-8B's projection shapes: the
  dense GEMM of the same weights in the activations' dtype (`F.linear`: cuBLAS on a GPU, oneDNN on a CPU).
  Bytes are the weights as stored plus the activations in and out.
The headline is decode attention at batch 64 with 4k-token contexts (target: ≥ 70% of copy bandwidth); its
launch settings are swept and every configuration is kept in the result file.

    python bench/kernels.py                 # on a CUDA GPU
    python bench/kernels.py --cpu-smoke     # references only, small shapes, a few seconds
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench.report import print_table, save_result  # noqa: E402
from services.llm.kernels import activation, attention, kv_store, norm, rotary  # noqa: E402

BLOCK = 16


class Timer:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device, repeats: int, warmup: int = 3) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                begin = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin)
        return statistics.median(times)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Bytes per second of a large device-to-device copy (read + write both counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * nbytes / seconds


def paged_inputs(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """A paged cache holding exactly these sequences, blocks shuffled as after real allocation and frees."""
    blocks_per_seq = [-(-n // BLOCK) for n in seq_lens]
    total = sum(blocks_per_seq)
    k_cache = torch.randn(total, BLOCK, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    order = torch.randperm(total, device=device).to(torch.int32)
    tables = torch.zeros(len(seq_lens), max(blocks_per_seq), dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = order[used:used + n]
        used += n
    return {"k_cache": k_cache, "v_cache": v_cache, "block_tables": tables,
            "seq_lens": torch.tensor(seq_lens, dtype=torch.int32, device=device)}


def sdpa_backends(device: torch.device) -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION}
    return {"sdpa-math": SDPBackend.MATH}


def run_sdpa(backend: object, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[Callable, str]:
    """A callable running SDPA on one backend, GQA natively when the backend takes it, else with expanded heads."""
    from torch.nn.attention import sdpa_kernel

    group = q.shape[1] // k.shape[1]

    def native() -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)

    try:
        native()
        return native, "gqa"
    except RuntimeError:
        k_full, v_full = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

        def expanded() -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k_full, v_full, is_causal=causal)

        expanded()
        return expanded, "expanded-heads"


def record(rows: list[dict], case: str, impl: str, seconds: float, nbytes: float | None, flops: float | None,
           copy_bw: float, note: str = "") -> None:
    row: dict[str, object] = {"case": case, "impl": impl, "time_us": seconds * 1e6, "note": note}
    if nbytes is not None:
        row["gb_per_s"] = nbytes / seconds / 1e9
        row["pct_of_copy"] = 100 * nbytes / seconds / copy_bw
    if flops is not None:
        row["tflops"] = flops / seconds / 1e12
    rows.append(row)


def attempt(errors: list[str], label: str, fn: Callable[[], None]) -> None:
    """Runs one measurement; a failure is recorded and the benchmark carries on with the next one."""
    try:
        fn()
    except Exception as exc:  # one broken case must not lose the numbers of the others
        errors.append(f"{label}: {type(exc).__name__}: {exc}")
        print(f"[error] {label}: {exc}", file=sys.stderr)
        traceback.print_exc(limit=3)


def bench_decode(rows: list[dict], errors: list[str], sweep_rows: list[dict], *, batch: int, context: int,
                 heads: tuple[int, int, int], dtype: torch.dtype, device: torch.device, timer: Timer,
                 copy_bw: float, use_triton: bool, sweep: bool) -> None:
    num_heads, num_kv_heads, head_dim = heads
    case = f"decode B={batch} L={context} H={num_heads}/{num_kv_heads} D={head_dim}"
    inputs = paged_inputs([context] * batch, num_heads, num_kv_heads, head_dim, dtype, device)
    q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device)
    scale = head_dim ** -0.5
    element = torch.empty((), dtype=dtype).element_size()
    nbytes = 2 * batch * context * num_kv_heads * head_dim * element + 2 * q.numel() * element
    args = (q, inputs["k_cache"], inputs["v_cache"], inputs["block_tables"], inputs["seq_lens"], scale)

    def reference() -> None:
        record(rows, case, "torch-reference", timer(lambda: attention.paged_decode_attention_reference(*args)),
               nbytes, None, copy_bw)

    attempt(errors, f"{case} reference", reference)
    if use_triton:
        from services.llm.kernels import attention_triton

        def triton_default() -> None:
            seconds = timer(lambda: attention_triton.paged_decode_attention_triton(*args))
            splits = attention_triton.decode_num_splits(batch, num_kv_heads, inputs["block_tables"].shape[1] * BLOCK,
                                                        attention_triton.target_programs(device))
            record(rows, case, "triton", seconds, nbytes, None, copy_bw, note=f"auto: {splits} split(s)")

        attempt(errors, f"{case} triton", triton_default)
        if sweep:
            configs = list(itertools.product((None, 2, 4, 8), (32, 64, 128), (4, 8), (2, 3)))
            for splits, block_n, warps, stages in tqdm(configs, desc="decode sweep", leave=False):
                def one(splits=splits, block_n=block_n, warps=warps, stages=stages) -> None:
                    seconds = timer(lambda: attention_triton.paged_decode_attention_triton(
                        *args, num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages))
                    sweep_rows.append({"case": case, "num_splits": splits or "auto", "block_n": block_n,
                                       "num_warps": warps, "num_stages": stages, "time_us": seconds * 1e6,
                                       "pct_of_copy": 100 * nbytes / seconds / copy_bw})

                attempt(errors, f"{case} sweep {splits}/{block_n}/{warps}/{stages}", one)
            mine = [r for r in sweep_rows if r["case"] == case]
            if mine:
                best = min(mine, key=lambda r: r["time_us"])
                rows.append({"case": case, "impl": "triton-best-swept", "time_us": best["time_us"],
                             "gb_per_s": nbytes / (best["time_us"] / 1e6) / 1e9, "pct_of_copy": best["pct_of_copy"],
                             "note": f"splits={best['num_splits']} block_n={best['block_n']} "
                                     f"warps={best['num_warps']} stages={best['num_stages']}"})

    # Peer: the same keys and values, dense, one query per sequence.
    dense_k = inputs["k_cache"].view(batch, -1, num_kv_heads, head_dim)[:, :context].transpose(1, 2).contiguous()
    dense_v = inputs["v_cache"].view(batch, -1, num_kv_heads, head_dim)[:, :context].transpose(1, 2).contiguous()
    dense_q = q[:, :, None, :]
    for name, backend in sdpa_backends(device).items():
        def peer(name=name, backend=backend) -> None:
            fn, how = run_sdpa(backend, dense_q, dense_k, dense_v, causal=False)
            record(rows, case, name, timer(fn), nbytes, None, copy_bw, note=f"dense, {how}")

        attempt(errors, f"{case} {name}", peer)


def bench_prefill(rows: list[dict], errors: list[str], *, batch: int, length: int, heads: tuple[int, int, int],
                  dtype: torch.dtype, device: torch.device, timer: Timer, copy_bw: float, use_triton: bool) -> None:
    num_heads, num_kv_heads, head_dim = heads
    case = f"prefill B={batch} L={length} H={num_heads}/{num_kv_heads} D={head_dim}"
    inputs = paged_inputs([length] * batch, num_heads, num_kv_heads, head_dim, dtype, device)
    q = torch.randn(batch * length, num_heads, head_dim, dtype=dtype, device=device)
    cu = torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    flops = 4 * batch * num_heads * head_dim * length * (length + 1) / 2  # causal half of QK^T and PV
    args = (q, inputs["k_cache"], inputs["v_cache"], inputs["block_tables"], cu, inputs["seq_lens"], scale)

    def reference() -> None:
        record(rows, case, "torch-reference", timer(lambda: attention.paged_attention_reference(*args)), None, flops,
               copy_bw)

    attempt(errors, f"{case} reference", reference)
    if use_triton:
        from services.llm.kernels import attention_triton

        for block_m, block_n, warps in ((64, 64, 4), (128, 64, 8), (64, 32, 4)):
            def one(block_m=block_m, block_n=block_n, warps=warps) -> None:
                seconds = timer(lambda: attention_triton.paged_attention_triton(
                    *args, block_m=block_m, block_n=block_n, num_warps=warps))
                record(rows, case, "triton", seconds, None, flops, copy_bw,
                       note=f"block_m={block_m} block_n={block_n} warps={warps}")

            attempt(errors, f"{case} triton {block_m}/{block_n}/{warps}", one)
    dense_q = q.view(batch, length, num_heads, head_dim).transpose(1, 2).contiguous()
    dense_k = inputs["k_cache"].view(batch, -1, num_kv_heads, head_dim)[:, :length].transpose(1, 2).contiguous()
    dense_v = inputs["v_cache"].view(batch, -1, num_kv_heads, head_dim)[:, :length].transpose(1, 2).contiguous()
    for name, backend in sdpa_backends(device).items():
        def peer(name=name, backend=backend) -> None:
            fn, how = run_sdpa(backend, dense_q, dense_k, dense_v, causal=True)
            record(rows, case, name, timer(fn), None, flops, copy_bw, note=f"dense causal, {how}")

        attempt(errors, f"{case} {name}", peer)


def bench_elementwise(rows: list[dict], errors: list[str], *, tokens: int, hidden: int, intermediate: int,
                      heads: tuple[int, int, int], dtype: torch.dtype, device: torch.device, timer: Timer,
                      copy_bw: float, use_triton: bool) -> None:
    num_heads, num_kv_heads, head_dim = heads
    element = torch.empty((), dtype=dtype).element_size()
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)
    residual = torch.randn_like(x)
    weight = torch.rand(hidden, dtype=dtype, device=device) + 0.5
    gate_up = torch.randn(tokens, 2 * intermediate, dtype=dtype, device=device)
    qkv = torch.randn(tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
    q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]
    key, value = qkv[:, num_heads:num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads:]
    positions = torch.randint(0, 4096, (tokens,), device=device)
    cos_sin = rotary.build_cos_sin_cache(head_dim, 4096, 500000.0, dtype=torch.float32, device=device)
    num_blocks = -(-tokens // BLOCK) + 1
    k_cache = torch.zeros(num_blocks, BLOCK, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(num_blocks * BLOCK, device=device)[:tokens]

    kv_bytes = 4 * tokens * num_kv_heads * head_dim * element + slots.numel() * 8
    cases: list[tuple[str, int, Callable[[], object], Callable[[], object] | None]] = [
        (f"store_kv T={tokens} Hkv={num_kv_heads} D={head_dim}", kv_bytes,
         lambda: kv_store.store_kv_reference(key, value, k_cache, v_cache, slots),
         lambda: kv_store.store_kv(key, value, k_cache, v_cache, slots)),
        (f"fused_add_rms_norm T={tokens} H={hidden}", 4 * x.numel() * element,
         lambda: norm.fused_add_rms_norm_reference(x, residual, weight, 1e-5),
         lambda: norm.fused_add_rms_norm(x, residual, weight, 1e-5)),
        (f"rotary T={tokens} H={num_heads}/{num_kv_heads} D={head_dim}",
         2 * tokens * (num_heads + num_kv_heads) * head_dim * element + tokens * head_dim * 4,
         lambda: rotary.apply_rotary_reference(q, k, positions, cos_sin),
         lambda: rotary.apply_rotary(q, k, positions, cos_sin)),
        (f"silu_and_mul T={tokens} I={intermediate}", 3 * tokens * intermediate * element,
         lambda: activation.silu_and_mul_reference(gate_up),
         lambda: activation.silu_and_mul(gate_up)),
    ]
    for case, nbytes, reference, ours in cases:
        def measure(case=case, nbytes=nbytes, reference=reference, ours=ours) -> None:
            record(rows, case, "torch-reference", timer(reference), nbytes, None, copy_bw)
            if use_triton:
                record(rows, case, "triton", timer(ours), nbytes, None, copy_bw)

        attempt(errors, case, measure)


def bench_weight_only_gemm(rows: list[dict], errors: list[str], *, shapes: list[tuple[str, int, int]],
                           row_counts: list[int], dtype: torch.dtype, device: torch.device, timer: Timer,
                           copy_bw: float) -> None:
    import gguf

    from services.llm.kernels.gguf_matmul import FORMATS, gguf_matmul, unpack_rows
    from services.llm.kernels.int8_matmul import int8_matmul, quantize_int8_per_channel

    element = torch.empty((), dtype=dtype).element_size()
    ours_impl = "triton" if device.type == "cuda" else "torch-reference"
    for name, out_features, in_features in shapes:
        weights = torch.randn(out_features, in_features) * 0.02
        dense = weights.to(device=device, dtype=dtype)
        q8, scale8 = quantize_int8_per_channel(weights)
        formats: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
            "int8": (lambda x, q=q8.to(device), s=scale8.to(device=device, dtype=dtype): int8_matmul(x, q, s),
                     q8.numel() + out_features * element)}
        for fmt in ("Q8_0", "Q4_0", "Q4_1"):  # Q4_K runs Q4_1's code with fp32 scales; gguf cannot quantize to it
            fmt_id = FORMATS[fmt]
            q, scale, minimum = (None if t is None else t.to(device) for t in unpack_rows(
                fmt, gguf.quants.quantize(weights.numpy(), gguf.GGMLQuantizationType[fmt])))
            stored = q.numel() + 2 * scale.numel() * (2 if minimum is not None else 1)
            formats[fmt] = (lambda x, f=fmt_id, q=q, s=scale, m=minimum: gguf_matmul(x, f, q, s, m), stored)
        for count in row_counts:
            x = torch.randn(count, in_features, device=device, dtype=dtype)
            case = f"linear {name} {count}x{in_features}->{out_features}"
            activations = count * (in_features + out_features) * element
            flops = 2 * count * in_features * out_features

            def measure(case=case, x=x, activations=activations, flops=flops, dense=dense, formats=formats) -> None:
                record(rows, case, "dense-F.linear", timer(lambda: F.linear(x, dense)),
                       dense.numel() * element + activations, flops, copy_bw)
                for fmt, (matmul, stored) in formats.items():
                    record(rows, case, f"{ours_impl} {fmt}", timer(lambda m=matmul: m(x)), stored + activations,
                           flops, copy_bw)

            attempt(errors, case, measure)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="references only, small shapes, on the CPU")
    parser.add_argument("--no-sweep", action="store_true", help="skip the decode launch-settings sweep")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    args = parser.parse_args()

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    if smoke and not args.cpu_smoke:
        print("no CUDA device: running the CPU smoke configuration", file=sys.stderr)
    device = torch.device("cpu" if smoke else "cuda")
    use_triton = not smoke
    timer = Timer(device, repeats=args.repeats or (3 if smoke else 20), warmup=1 if smoke else 5)
    torch.manual_seed(0)
    rows: list[dict] = []
    sweep_rows: list[dict] = []
    errors: list[str] = []

    if smoke:
        dtype, heads = torch.float32, (9, 3, 64)  # SmolLM2-135M, the bundled model, as the CPU engine runs it
        copy_bw = copy_bandwidth(device, timer, 64 * 2**20)
        decode_cases = [(8, 512)]
        prefill_cases = [(2, 128)]
        elementwise = {"tokens": 256, "hidden": 576, "intermediate": 1536}
        gemm_shapes, gemm_rows = [("gate_up", 3072, 576), ("down", 576, 1536)], [1, 8, 64]
    else:
        dtype, heads = torch.bfloat16, (32, 8, 128)
        copy_bw = copy_bandwidth(device, timer, 2 * 2**30)
        # Batch 1/16/64 at 1k/4k/16k-token contexts, a long single context and a wide batch of short ones.
        decode_cases = [(batch, context) for batch in (1, 16, 64) for context in (1024, 4096, 16384)]
        decode_cases += [(1, 32768), (256, 1024)]
        prefill_cases = [(4, 2048), (1, 8192)]
        elementwise = {"tokens": 8192, "hidden": 4096, "intermediate": 14336}
        gemm_shapes, gemm_rows = [("qkv", 6144, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)], [1, 16, 256,
                                                                                                           2048]
    print(f"device: {device}, copy bandwidth {copy_bw / 1e9:,.0f} GB/s")

    for batch, context in tqdm(decode_cases, desc="decode attention"):
        # The launch sweep runs on the headline case only.
        sweep = use_triton and not args.no_sweep and (batch, context) == (64, 4096)
        attempt(errors, f"decode {batch}x{context}", lambda b=batch, c=context, s=sweep: bench_decode(
            rows, errors, sweep_rows, batch=b, context=c, heads=heads, dtype=dtype, device=device, timer=timer,
            copy_bw=copy_bw, use_triton=use_triton, sweep=s))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for batch, length in tqdm(prefill_cases, desc="prefill attention"):
        attempt(errors, f"prefill {batch}x{length}", lambda b=batch, n=length: bench_prefill(
            rows, errors, batch=b, length=n, heads=heads, dtype=dtype, device=device, timer=timer, copy_bw=copy_bw,
            use_triton=use_triton))
    attempt(errors, "elementwise", lambda: bench_elementwise(
        rows, errors, heads=heads, dtype=dtype, device=device, timer=timer, copy_bw=copy_bw, use_triton=use_triton,
        **elementwise))
    # Weight-only GEMMs in bf16 on either device: the CPU engine runs bf16 where the cores have AMX/AVX512-BF16.
    gemm_dtype = torch.bfloat16
    attempt(errors, "weight-only GEMMs", lambda: bench_weight_only_gemm(
        rows, errors, shapes=gemm_shapes, row_counts=gemm_rows, dtype=gemm_dtype, device=device, timer=timer,
        copy_bw=copy_bw))

    header = ["case", "impl", "time_us", "GB/s", "% copy BW", "TFLOP/s", "note"]
    print_table(f"LLM kernels on {device} ({str(dtype).removeprefix('torch.')}), copy bandwidth "
                f"{copy_bw / 1e9:,.0f} GB/s", header,
                [[r["case"], r["impl"], r["time_us"], r.get("gb_per_s", "-"), r.get("pct_of_copy", "-"),
                  r.get("tflops", "-"), r.get("note", "")] for r in rows])
    if sweep_rows:
        best = sorted(sweep_rows, key=lambda r: r["time_us"])[:8]
        print_table("decode sweep, fastest 8", list(best[0]), [list(r.values()) for r in best])
    headline = [r for r in rows if r["case"].startswith("decode B=64 L=4096") and r["impl"].startswith("triton")]
    for r in headline:
        print(f"headline: {r['case']} {r['impl']}: {r['pct_of_copy']:.0f}% of copy bandwidth (target ≥ 70%)")
    if errors:
        print(f"\n{len(errors)} measurement(s) failed:", *errors, sep="\n  ", file=sys.stderr)

    ours = [r for r in rows if r["impl"].startswith(("triton", "torch-reference"))]
    peer = [r for r in rows if r["impl"].startswith(("sdpa", "dense"))]
    path = save_result(
        "kernels" + ("-cpu-smoke" if smoke else ""),
        workload={"dtype": str(dtype).removeprefix("torch."), "heads_q_kv_dim": heads, "kv_block_size": BLOCK,
                  "decode_cases": decode_cases, "prefill_cases": prefill_cases, "elementwise": elementwise,
                  "weight_only_gemms": {"dtype": "bfloat16", "shapes_out_in": gemm_shapes, "rows": gemm_rows},
                  "timing": f"median of {timer.repeats} after {timer.warmup} warm-up runs"},
        ours=ours, peer=peer, limit={"copy_bandwidth_gb_per_s": copy_bw / 1e9},
        extra={"decode_sweep": sweep_rows, "errors": errors},
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
