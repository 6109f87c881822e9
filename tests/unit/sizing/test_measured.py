"""Measured points from aiperf exports and bench/llm_serve.py results, and the calibration on them.

data/aiperf-cpu-sweep/ holds the summary exports of a small real aiperf 0.13 run against our LLM server on CPU
(see its README.md); the other samples follow aiperf's documented `profile_export_aiperf.json` schema.
"""

import json
from pathlib import Path

import pytest

from scripts.sizing.devices import load_device
from scripts.sizing.measured import MeasuredPoint, NotAPoint, from_aiperf, from_llm_serve, read_points
from scripts.sizing.plan import build_plan
from scripts.sizing.roofline import CALIBRATED, MEASURED, MODELLED, Efficiency, Roofline, Workload
from scripts.sizing.selection import Limits
from scripts.sizing.shapes import load_shape

SWEEP = Path(__file__).parent / "data" / "aiperf-cpu-sweep"


def aiperf_export(concurrency: int = 8, unit: str = "ms", scale: float = 1.0) -> dict:
    """The documented shape (schema 1.1-1.3, `loadgen` config of aiperf before 0.13)."""
    def record(avg: float) -> dict:
        value = avg * scale
        return {"unit": unit, "avg": value, "p50": value * 0.9, "p90": value * 1.3, "p99": value * 1.6,
                "min": value / 2, "max": value * 2, "std": value / 5, "count": 40, "sum": value * 40}

    return {
        "schema_version": "1.3", "aiperf_version": "0.4.0", "benchmark_id": f"run-{concurrency}",
        "time_to_first_token": record(120.0), "inter_token_latency": record(12.5), "request_latency": record(1720.0),
        "request_throughput": {"unit": "requests/sec", "avg": 4.6},
        "output_token_throughput": {"unit": "tokens/sec", "avg": 589.0},
        "input_sequence_length": {"unit": "tokens", "avg": 512.0, "count": 40},
        "output_sequence_length": {"unit": "tokens", "avg": 128.0, "count": 40},
        "telemetry_data": {"endpoints": {"localhost:9400": {"gpus": {"gpu_0": {"gpu_name": "NVIDIA H100 80GB HBM3"}}}}},
        "input_config": {"endpoint": {"model_names": ["meta-llama/Meta-Llama-3-8B-Instruct"], "streaming": True},
                         "loadgen": {"concurrency": concurrency, "request_count": 40}},
        "was_cancelled": False,
    }


def test_documented_aiperf_export() -> None:
    point = from_aiperf(aiperf_export(), "x.json")
    assert (point.concurrency, point.input_tokens, point.output_tokens) == (8, 512.0, 128.0)
    assert (point.ttft_s, point.itl_s, point.e2e_s, point.rps) == pytest.approx((0.12, 0.0125, 1.72, 4.6))
    assert point.device == "NVIDIA H100 80GB HBM3" and point.model == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert from_aiperf(aiperf_export(), "x.json", stat="p90").ttft_s == pytest.approx(0.156)


def test_units_are_read_not_assumed() -> None:
    assert from_aiperf(aiperf_export(unit="s", scale=1e-3), "x").ttft_s == pytest.approx(0.12)
    assert from_aiperf(aiperf_export(unit="us", scale=1e3), "x").itl_s == pytest.approx(0.0125)
    bad = aiperf_export()
    bad["time_to_first_token"]["unit"] = "tokens"
    with pytest.raises(NotAPoint, match="not a time"):
        from_aiperf(bad, "x")


def test_concurrency_from_a_sweep_variation_and_rate_runs_refused() -> None:
    data = aiperf_export()
    data["input_config"] = {"phases": {"profiling": {"request_rate": 5.0}}}
    with pytest.raises(NotAPoint, match="concurrency"):
        from_aiperf(data, "x")
    data["run_info"] = {"variation_values": {"phases.profiling.concurrency": 40}}
    assert from_aiperf(data, "x").concurrency == 40


def test_real_aiperf_run_on_cpu() -> None:
    points, skipped = read_points([SWEEP])
    assert not skipped
    by_concurrency = {p.concurrency: p for p in points}
    assert set(by_concurrency) >= {1, 2}  # one point per run: the per-phase copies are not counted again
    for p in points:
        assert p.model == "SmolLM2-135M-Instruct.Q4_1.gguf" and p.device == ""
        assert p.input_tokens == 128 and 60 <= p.output_tokens <= 64
        assert 0 < p.itl_s < p.e2e_s and 0 < p.ttft_s < p.e2e_s
        assert p.rps == pytest.approx(p.concurrency / p.e2e_s, rel=0.35)  # Little's law, roughly


def test_llm_serve_result_and_other_files(tmp_path: Path) -> None:
    result = {"name": "llm_serve", "device": "Intel(R) Xeon(R) Processor",
              "workload": {"concurrency": 16, "input_len": 128, "output_len": 64, "model": "SmolLM2.gguf"},
              "ours": {"completed": 64, "output_tokens": 4047, "request_throughput_rps": 0.395,
                       "ttft_ms": {"mean": 4006.4, "p50": 2382.3}, "itl_ms": {"mean": 550.2, "p50": 470.3},
                       "e2e_ms": {"mean": 38234.3, "p50": 39258.9}},
              "peer": {}}
    point = from_llm_serve(result, "r.json")
    assert (point.concurrency, point.output_tokens, point.ttft_s, point.rps) == pytest.approx(
        (16, 4047 / 64, 4.0064, 0.395))
    assert from_llm_serve(result, "r.json", stat="p50").itl_s == pytest.approx(0.4703)
    (tmp_path / "llm_serve-cpu.json").write_text(json.dumps(result))
    (tmp_path / "embed-cpu.json").write_text(json.dumps({"name": "embed", "ours": {}}))
    (tmp_path / "rate.json").write_text(json.dumps({**result, "workload": {"request_rate": 2.0}}))
    points, skipped = read_points([tmp_path])
    assert [p.concurrency for p in points] == [16]
    assert len(skipped) == 1 and "rate.json" in skipped[0]  # the embed result is passed over quietly
    points, skipped = read_points([tmp_path / "embed-cpu.json"])
    assert not points and "not an aiperf" in skipped[0]  # named explicitly, it is reported
    # The aiperf side by side (bench/llm_serve.py --peer): a sweep whose points are the exports kept beside it.
    sweep = tmp_path / "sweep" / "llm_serve-cpu.json"
    sweep.parent.mkdir()
    sweep.write_text(json.dumps({**result, "workload": {**result["workload"], "concurrency": [1, 8, 32]}}))
    assert read_points([sweep.parent]) == ([], [])  # in a folder: passed over quietly
    points, skipped = read_points([sweep])
    assert not points and "its points are the aiperf exports in" in skipped[0] and "sweep/llm_serve-cpu/" in skipped[0]


def synthetic_points(roofline: Roofline, eff: Efficiency, workload: Workload) -> list[MeasuredPoint]:
    points = []
    for c in (1, 4, 16, 64):
        est = roofline.serve(1, c, workload, eff)
        points.append(MeasuredPoint("synthetic", "", "", c, workload.mean_input, workload.mean_output,
                                    est.ttft_s, est.itl_s, est.e2e_s, est.rps))
    return points


def test_calibration_recovers_known_efficiencies() -> None:
    roofline = Roofline(load_shape("llama-3-8b"), load_device("h100-sxm"), "bf16", "bf16")
    truth = Efficiency(compute=0.3, bandwidth=0.5, step_overhead_s=2e-3)
    points = synthetic_points(roofline, truth, Workload.fixed(1024, 128))
    fit = roofline.calibrate(points)
    assert max(fit.error.values()) < 0.03
    assert max(fit.nominal_error.values()) > 0.2
    assert fit.efficiency.bandwidth == pytest.approx(0.5, rel=0.1)


def test_labels_say_where_each_point_comes_from() -> None:
    roofline = Roofline(load_shape("llama-3-8b"), load_device("h100-sxm"), "bf16", "bf16")
    workload = Workload.fixed(1024, 128)
    measured = synthetic_points(roofline, Efficiency(0.3, 0.5, 2e-3), workload)
    uncalibrated = build_plan(roofline, workload, Limits(), [1, 2])
    assert {p.label for p in uncalibrated.points} == {MODELLED} and uncalibrated.fit is None
    plan = build_plan(roofline, workload, Limits(), [1, 2], measured=measured)
    labels = {(p.tp, p.concurrency): p.label for p in plan.points}
    assert all(labels[1, c] == MEASURED for c in (1, 4, 16, 64))
    assert labels[1, 2] == labels[2, 1] == CALIBRATED
    other = build_plan(roofline, Workload.fixed(128, 1024), Limits(), [1], measured=measured)
    assert MEASURED not in {p.label for p in other.points}  # other lengths: they only calibrate


def test_points_of_another_model_or_device_are_skipped() -> None:
    roofline = Roofline(load_shape("llama-3-8b"), load_device("h100-sxm"), "bf16", "bf16")
    gpu_point = from_aiperf(aiperf_export(), "h100.json")
    plan = build_plan(roofline, Workload.fixed(512, 128), Limits(), [1], measured=[gpu_point])
    assert plan.measured == [gpu_point]
    on_h200 = Roofline(load_shape("llama-3-8b"), load_device("h200"), "bf16", "bf16")
    assert build_plan(on_h200, Workload.fixed(512, 128), Limits(), [1], measured=[gpu_point]).measured == []
    cpu_points, _ = read_points([SWEEP])
    plan = build_plan(roofline, Workload.fixed(128, 64), Limits(), [1], measured=cpu_points)
    assert plan.measured == [] and all("is not llama-3-8b" in s for s in plan.skipped)
