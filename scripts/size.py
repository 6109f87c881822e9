"""How much hardware an LLM workload needs: GPUs (or CPU replicas) for a peak load within latency limits.

The method of NVIDIA's GTC talk "LLM Inference Sizing" (S62797), open and run on our own numbers:
  1. sweep tensor parallelism (TP) and concurrency (batch) and get TTFT, ITL and requests/s per GPU for each;
  2. keep the configurations within the latency limits and whose KV cache fits in memory;
  3. report the throughput-optimal one (most requests/s per GPU) and the latency-optimal one (lowest TTFT when
     streaming, lowest end-to-end latency when sequential);
  4. turn the average request rate into a peak with the Poisson distribution (default: the 95th percentile of
     arrivals in one second) and that into replicas, GPUs and nodes, requests, users and tokens per day.

Where the points come from (every figure printed says which):
  measured              aiperf exports (profile_export_aiperf.json) or bench/llm_serve.py results given with
                        --measured, when their input/output lengths are within 25% of the workload's;
  modelled              an analytic roofline: prefill bound by FLOPs, decode by the bytes of weights + KV read
                        per step, TP splitting both and paying two all-reduces per layer over NVLink/PCIe;
  modelled, calibrated  the roofline with its compute/bandwidth efficiencies and per-step overhead fitted to
                        the measured points (the fit error is printed).

Examples (README, section "Sizing"):
  # the talk's Llama-7B question: 128 in / 512 out, 153k users x 10 requests in an 8-hour day, on DGX H100
  python scripts/size.py --model llama-7b --device h100-sxm --input-len 128 --output-len 512 \\
      --users 153000 --requests-per-user 10 --hours 8 --max-ttft 0.5 --max-itl 0.025 --plot 7b.png
  # CPU replicas of the laptop default for 2 requests/s with TTFT <= 2 s, from a measured aiperf sweep
  python scripts/size.py --model default --device cpu --precision fp32 \\
      --measured tests/unit/sizing/data/aiperf-cpu-sweep --input-len 128 --output-len 64 --rate 2 --max-ttft 2
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scripts.sizing import traffic
from scripts.sizing.devices import BUILTIN_DEVICES, load_device
from scripts.sizing.measured import STATS, read_points
from scripts.sizing.plan import CONCURRENCIES, Demand, Plan, build_plan
from scripts.sizing.roofline import Efficiency, Estimate, Roofline, Workload
from scripts.sizing.selection import Limits, fleet_for
from scripts.sizing.shapes import ALIASES, BUILTIN_MODELS, PRECISION_BYTES, load_shape


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hw = p.add_argument_group("model and hardware")
    hw.add_argument("--model", required=True,
                    help="a config directory (HF config.json), a .gguf file, or a built-in shape: "
                         + ", ".join(sorted([*BUILTIN_MODELS, *ALIASES])))
    hw.add_argument("--device", default="h100-sxm",
                    help="a built-in GPU (" + ", ".join(BUILTIN_DEVICES) + "), `cpu` (one replica of our CPU "
                         "server; calibrate it with --measured), or a JSON profile with the same fields "
                         "(name, kind, memory_gb, bandwidth_gbs, tflops{bf16,fp8,..}, link_gbs, link_latency_us, "
                         "per_node, kv_budget_gb)")
    hw.add_argument("--precision", default="bf16", choices=sorted(PRECISION_BYTES),
                    help="weights and compute (int4: 4-bit weights, 16-bit compute); default bf16")
    hw.add_argument("--kv-precision", choices=sorted(PRECISION_BYTES),
                    help="KV cache (default: fp8 with --precision fp8, fp32 with fp32, else bf16)")
    hw.add_argument("--memory-utilization", type=float, default=0.9,
                    help="share of device memory the engine may use for weights + KV (default 0.9)")
    hw.add_argument("--tp", type=_ints,
                    help="tensor-parallel sizes to try (default 1,2,4,8, up to the devices per node)")
    hw.add_argument("--concurrency", type=_ints, default=list(CONCURRENCIES),
                    help="concurrencies (running requests per replica) to try")

    wl = p.add_argument_group("workload")
    wl.add_argument("--input-len", type=float, help="prompt tokens per request")
    wl.add_argument("--output-len", type=float, help="generated tokens per request")
    wl.add_argument("--lengths", type=Path,
                    help="a file of `input output` token counts, one request a line (instead of the two above)")

    rate = p.add_argument_group("demand (one of --rate, --peak-rate, --users)")
    rate.add_argument("--rate", type=float, help="average requests/s")
    rate.add_argument("--peak-rate", type=float, help="requests/s to provision for, as is (no Poisson headroom)")
    rate.add_argument("--users", type=float, help="users per day (with --requests-per-user and --hours)")
    rate.add_argument("--requests-per-user", type=float, help="requests each user sends per day")
    rate.add_argument("--hours", type=float, default=8.0, help="working hours the daily load falls in (default 8)")
    rate.add_argument("--peak-percentile", type=float, default=0.95,
                      help="percentile of Poisson arrivals to provision for (default 0.95)")
    rate.add_argument("--peak-window", type=float, default=1.0,
                      help="seconds over which arrivals are counted for the peak (default 1, as in the talk)")

    lim = p.add_argument_group("latency limits (seconds)")
    lim.add_argument("--max-ttft", type=float, help="time to first token")
    lim.add_argument("--max-itl", type=float, help="inter-token latency (mean)")
    lim.add_argument("--max-e2e", type=float, help="end-to-end latency of a whole request")
    lim.add_argument("--mode", choices=["streaming", "sequential"], default="streaming",
                     help="streaming: TTFT and ITL limits apply (and --max-e2e if given); sequential: the client "
                          "waits for the whole answer, so only --max-e2e applies (default streaming)")

    src = p.add_argument_group("measured points and the model")
    src.add_argument("--measured", type=Path, nargs="+", default=[],
                     help="aiperf exports or bench/llm_serve.py results (files or folders, searched for *.json)")
    src.add_argument("--measured-tp", type=int, default=1, help="TP the measured runs used (default 1)")
    src.add_argument("--stat", choices=STATS, default="avg",
                     help="statistic of measured latencies to use (the model predicts means; default avg)")
    src.add_argument("--efficiency", type=float, nargs=3, metavar=("COMPUTE", "BANDWIDTH", "STEP_MS"),
                     help="set the roofline's efficiencies and per-step overhead instead of the defaults "
                          f"({Efficiency().compute}, {Efficiency().bandwidth}, {Efficiency().step_overhead_s * 1e3}"
                          " ms) or the calibrated ones")

    out = p.add_argument_group("output")
    out.add_argument("--price-per-gpu-hour", type=float, help="price of one GPU (or CPU replica) per hour")
    out.add_argument("--plot", type=Path, help="draw the Pareto fronts to this PNG (or .svg/.pdf)")
    out.add_argument("--all", action="store_true", help="print every configuration, not only the chosen ones")
    out.add_argument("--json", type=Path, help="also write the result as JSON")
    args = p.parse_args(argv)

    if args.lengths is None and (args.input_len is None or args.output_len is None):
        p.error("give --input-len and --output-len, or --lengths FILE")
    given = [n for n in ("rate", "peak_rate", "users") if getattr(args, n) is not None]
    if len(given) > 1:
        p.error("give only one of --rate, --peak-rate, --users")
    if args.users is not None and args.requests_per_user is None:
        p.error("--users needs --requests-per-user")
    if not 0 < args.peak_percentile < 1:
        p.error("--peak-percentile must be between 0 and 1")
    if args.mode == "sequential" and args.max_e2e is None and (args.max_ttft or args.max_itl):
        p.error("sequential mode applies only --max-e2e; give it (TTFT and ITL are not seen by the client)")
    return args


def demand_of(args: argparse.Namespace) -> Demand | None:
    common = (args.peak_percentile, args.peak_window, args.hours, args.requests_per_user)
    if args.rate is not None:
        return Demand.from_average(args.rate, *common)
    if args.users is not None:
        return Demand.from_average(traffic.average_rate(args.users, args.requests_per_user, args.hours), *common)
    if args.peak_rate is not None:
        return Demand.from_peak(args.peak_rate, *common)
    return None


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"


def _count(value: float) -> str:
    for size, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= size:
            return f"{value / size:.2f}{suffix}"
    return f"{value:.1f}"


def _bytes(value: float) -> str:
    for size, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= size:
            return f"{value / size:.1f} {suffix}"
    return f"{value:.0f} B"


def _row(name: str, p: Estimate, unit: str) -> str:
    return (f"  {name:<20} TP {p.tp:<2} conc {p.concurrency:<5} TTFT {_seconds(p.ttft_s):>9}  "
            f"ITL {_seconds(p.itl_s):>9}  E2E {_seconds(p.e2e_s):>9}  {p.rps_per_device:8.3f} req/s per {unit}"
            f"   [{p.label}]")


def report(plan: Plan, demand: Demand | None, args: argparse.Namespace) -> list[str]:
    r, w, dev = plan.roofline, plan.workload, plan.roofline.device
    unit = "GPU" if dev.kind == "gpu" else "replica"
    lines = [f"Sizing {r.shape.name} ({r.shape.params / 1e9:.2f} B parameters) on {dev.name}"
             + (f" ({dev.note})" if dev.note else ""),
             f"  precision: weights {r.precision}, KV cache {r.kv_precision}; "
             f"weights {_bytes(r.shape.weight_bytes(r.precision))}",
             f"  workload: {w.mean_input:.0f} input / {w.mean_output:.0f} output tokens"
             + (f" (mean of {len(w.input_tokens)} requests from {args.lengths})" if args.lengths else ""),
             f"  KV cache: {_bytes(r.shape.kv_bytes_per_token(r.kv_precision))} per token, "
             f"{_bytes(r.kv_per_request(w))} per request ({w.kv_tokens:.0f} tokens)",
             "  max batch that fits (" + (f"KV budget {_bytes(dev.kv_budget_gb * 1e9)}" if dev.kv_budget_gb
                                           else f"{args.memory_utilization:.0%} of {dev.memory_gb:g} GB") + "): "
             + ", ".join(f"TP {tp}: {mb}" + (" (weights do not fit)" if mb == 0 else "")
                         for tp, mb in plan.max_batch.items()),
             "  memory-bound configurations excluded: "
             + ", ".join(f"TP {tp}: {n} of {len(args.concurrency)}" for tp, n in plan.memory_bound.items())]
    if plan.fit:
        f = plan.fit
        lines.append(f"  model: calibrated on {f.points} measured points: compute efficiency "
                     f"{f.efficiency.compute:.3g}, bandwidth efficiency {f.efficiency.bandwidth:.3g}, step overhead "
                     f"{f.efficiency.step_overhead_s * 1e3:.3g} ms")
        lines.append("  fit error (mean |model/measured - 1|): " + ", ".join(
            f"{k} {v:.0%}" for k, v in f.error.items()) + "  (uncalibrated: " + ", ".join(
            f"{k} {v:.0%}" for k, v in f.nominal_error.items()) + ")")
    else:
        e = Efficiency(*args.efficiency[:2], args.efficiency[2] / 1e3) if args.efficiency else Efficiency()
        lines.append(f"  model: roofline, not calibrated (compute efficiency {e.compute}, bandwidth efficiency "
                     f"{e.bandwidth}, step overhead {e.step_overhead_s * 1e3:g} ms)")
    lines += [f"  skipped: {s}" for s in plan.skipped]
    bounds = plan.limits.bounds()
    lines.append(f"limits ({plan.limits.mode}): " + (", ".join(
        f"{k.removesuffix('_s').upper()} <= {_seconds(v)}" for k, v in bounds.items()) or "none"))

    if args.all:
        lines.append("all configurations:")
        lines += [_row("ok" if plan.limits.admits(p) else "over the limit", p, unit) for p in plan.points]
    choice = plan.choice
    lines.append("chosen:")
    if choice.throughput_optimal is None:
        miss = choice.nearest_miss
        lines.append("  none fits the limits" + (" (and no configuration fits in memory)" if miss is None else ""))
        if miss is not None:
            lines.append(_row("nearest miss", miss, unit) + f"  ({plan.limits.excess(miss):.2f}x the tightest limit)")
        return lines
    chosen = {"throughput-optimal": choice.throughput_optimal, "latency-optimal": choice.latency_optimal}
    lines += [_row(name, p, unit) for name, p in chosen.items()]

    hours = args.hours
    if dev.kind == "gpu":
        lines.append(f"per node of {dev.per_node} GPUs (the talk's conversion: a node's capacity is its peak):")
        for name, p in chosen.items():
            capacity = p.rps_per_device * dev.per_node
            average = traffic.average_for_peak(capacity, args.peak_percentile, args.peak_window)
            users = (f", {_count(traffic.users_per_day(average, args.requests_per_user, hours))} users"
                     if args.requests_per_user else "")
            lines.append(f"  {name:<20} peak {capacity:.1f} req/s -> average {average:.1f} req/s "
                         f"-> {_count(traffic.requests_per_day(average, hours))} requests per {hours:g}-hour day"
                         f"{users}  [{p.label}]")
    if demand is None:
        lines.append("no demand given (--rate, --peak-rate or --users): capacities only")
        return lines
    lines.append(f"demand: average {demand.average_rps:.3g} req/s -> provision for {demand.peak_rps:.3g} req/s "
                 f"({demand.percentile:.0%} of Poisson arrivals per {demand.window_s:g} s)")
    tokens_in, tokens_out = traffic.tokens_per_day(demand.average_rps, hours, w.mean_input, w.mean_output)
    users = (f", {_count(traffic.users_per_day(demand.average_rps, demand.requests_per_user, hours))} users"
             if demand.requests_per_user else "")
    lines.append(f"  per {hours:g}-hour day: {_count(traffic.requests_per_day(demand.average_rps, hours))} requests"
                 f"{users}, {_count(tokens_in)} input + {_count(tokens_out)} output tokens")
    for name, p in chosen.items():
        fleet = fleet_for(p, demand.peak_rps, dev.per_node)
        where = (f"{fleet.devices} GPUs = {fleet.nodes} node(s) of {dev.per_node}" if dev.kind == "gpu"
                 else f"{fleet.devices} CPU replica(s)")
        cost = (f"; {fleet.devices * args.price_per_gpu_hour * 24:,.0f}/day at {args.price_per_gpu_hour:g} "
                f"per {unit}-hour" if args.price_per_gpu_hour else "")
        lines.append(f"  {name:<20} {fleet.replicas} replica(s) x TP {p.tp} -> {where}{cost}  [{p.label}]")
    return lines


def main(argv: list[str] | None = None) -> Plan:
    args = parse_args(argv)
    try:
        shape = load_shape(args.model)
        device = load_device(args.device)
        kv = args.kv_precision or {"fp8": "fp8", "fp32": "fp32"}.get(args.precision, "bf16")
        roofline = Roofline(shape, device, args.precision, kv, args.memory_utilization)
        workload = (Workload.from_file(args.lengths) if args.lengths
                    else Workload.fixed(args.input_len, args.output_len))
    except (ValueError, OSError) as exc:
        sys.exit(f"size.py: {exc}")
    points, unreadable = read_points(args.measured, args.stat, args.measured_tp)
    efficiency = Efficiency(*args.efficiency[:2], args.efficiency[2] / 1e3) if args.efficiency else None
    limits = Limits(args.max_ttft, args.max_itl, args.max_e2e, args.mode)
    tps = args.tp or [tp for tp in (1, 2, 4, 8) if tp <= max(device.per_node, 1)]
    plan = build_plan(roofline, workload, limits, tps, args.concurrency, points, efficiency)
    plan.skipped += unreadable
    demand = demand_of(args)
    print("\n".join(report(plan, demand, args)))
    if args.plot:
        from scripts.sizing.plot import plot_fronts

        title = (f"{shape.name} on {device.name}, {args.precision}, {workload.mean_input:.0f} in / "
                 f"{workload.mean_output:.0f} out, {limits.mode}")
        plot_fronts(plan.points, limits, plan.choice, args.plot, title, "GPU" if device.kind == "gpu" else "replica")
        print(f"plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({
            "points": [asdict(p) for p in plan.points],
            "throughput_optimal": plan.choice.throughput_optimal and asdict(plan.choice.throughput_optimal),
            "latency_optimal": plan.choice.latency_optimal and asdict(plan.choice.latency_optimal),
            "nearest_miss": plan.choice.nearest_miss and asdict(plan.choice.nearest_miss),
            "demand": demand and asdict(demand),
            "fit": plan.fit and asdict(plan.fit),
        }, indent=1))
    return plan


if __name__ == "__main__":
    main()
