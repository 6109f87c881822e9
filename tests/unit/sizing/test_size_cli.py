"""scripts/size.py end to end: the talk's two questions, the CPU path, the plot, --help and bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import size
from scripts.sizing import traffic
from scripts.sizing.roofline import MEASURED

ROOT = Path(__file__).resolve().parents[3]
SWEEP = Path(__file__).parent / "data" / "aiperf-cpu-sweep"
TALK = ["--device", "h100-sxm", "--input-len", "128", "--output-len", "512", "--users", "153000",
        "--requests-per-user", "10", "--hours", "8", "--max-ttft", "0.5", "--max-itl", "0.025"]


def test_talk_llama_7b_question_in_one_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = size.main(["--model", "llama-7b", *TALK, "--plot", str(tmp_path / "7b.png"),
                      "--json", str(tmp_path / "7b.json"), "--price-per-gpu-hour", "2.5"])
    out = capsys.readouterr().out
    assert "per node of 8 GPUs" in out and "requests per 8-hour day" in out and "1.53M requests" in out
    assert "KV cache: 512.0 KiB per token" in out and "/day at 2.5 per GPU-hour" in out
    assert (tmp_path / "7b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((tmp_path / "7b.json").read_text())
    best = result["throughput_optimal"]
    assert best["ttft_s"] <= 0.5 and best["itl_s"] <= 0.025 and best["label"] == "modelled"
    assert result["demand"]["peak_rps"] == traffic.peak_rate(1_530_000 / 28_800)
    assert plan.choice.latency_optimal.ttft_s == min(p.ttft_s for p in plan.points if plan.limits.admits(p))


def test_talk_llama_70b_question_in_one_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = size.main(["--model", "llama-70b", *TALK, "--plot", str(tmp_path / "70b.png")])
    out = capsys.readouterr().out
    assert "TP 1: 0 (weights do not fit)" in out
    assert plan.choice.throughput_optimal.tp >= 2
    assert (tmp_path / "70b.png").stat().st_size > 10_000


def test_cpu_replicas_from_the_measured_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "default", "--device", "cpu", "--precision", "fp32", "--measured", str(SWEEP),
            "--input-len", "128", "--output-len", "64", "--rate", "2"]
    plan = size.main([*argv, "--max-ttft", "60"])
    out = capsys.readouterr().out
    assert plan.fit is not None and "calibrated on" in out and "fit error" in out
    assert {p.concurrency for p in plan.points if p.label == MEASURED} >= {1, 2}
    best = plan.choice.throughput_optimal
    replicas = math.ceil(traffic.peak_rate(2.0) / best.rps)
    assert f"{replicas} replica(s) x TP 1 -> {replicas} CPU replica(s)" in out
    # a limit below every measured and modelled TTFT: none fits, and the nearest miss is named
    plan = size.main([*argv, "--max-ttft", "0.001"])
    assert "none fits the limits" in capsys.readouterr().out and plan.choice.nearest_miss is not None


def test_lengths_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lengths = tmp_path / "lengths.csv"
    lengths.write_text("input,output\n100,50\n300,150\n")
    plan = size.main(["--model", "llama-3-8b", "--lengths", str(lengths), "--rate", "10"])
    assert (plan.workload.mean_input, plan.workload.mean_output) == (200, 100)
    assert "mean of 2 requests" in capsys.readouterr().out


def test_help_explains_the_method() -> None:
    done = subprocess.run([sys.executable, "scripts/size.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    for words in ("measured", "modelled, calibrated", "Poisson", "--max-ttft", "--plot", "h100-sxm"):
        assert words in done.stdout


def test_bad_input_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        size.main(["--model", "llama-7b", "--input-len", "128"])
    assert exited.value.code == 2 and "--output-len" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown model"):
        size.main(["--model", "gpt-17", "--input-len", "1", "--output-len", "1"])
    with pytest.raises(SystemExit, match="no fp8"):
        size.main(["--model", "llama-7b", "--device", "a100-80g", "--precision", "fp8", "--input-len", "1",
                   "--output-len", "1"])
