"""bench/llm_serve.py against the real server: a small bounded run reports every figure."""

from __future__ import annotations

from bench.llm_serve import RequestResult, Workload, build_requests, main, summarize
from tests.support.processes import ServiceProcess


def test_rag_workload_fills_three_quarters_of_the_context() -> None:
    workload = Workload(kind="rag", endpoint="chat", num_requests=3, input_len=0, output_len=0, range_ratio=0.5,
                        concurrency=None, request_rate=None, burstiness=1.0, max_seconds=10, seed=0,
                        ignore_eos=False)
    requests = build_requests(workload, context_len=1024)
    assert [(len(prompt.split()), answer) for prompt, answer in requests] == [(768, 128)] * 3
    assert build_requests(workload, 1024) == requests  # deterministic for a seed


def test_tokens_from_requests_cut_off_mid_stream_count() -> None:
    finished = RequestResult(ok=True, prompt_words=4, max_tokens=8, pieces=8, usage_tokens=8, ttft=0.1, e2e=0.8)
    cut_off = RequestResult(ok=False, prompt_words=4, max_tokens=8, pieces=3, ttft=0.2,
                            error="cut off by --max-seconds")
    summary = summarize([finished, cut_off], duration=2.0, slo_ttft_ms=None, slo_tpot_ms=None, num_requests=2)
    assert summary["completed"] == 1 and summary["failed"] == 1
    assert summary["output_tokens"] == 11 and summary["output_throughput_tok_s"] == 5.5


def test_small_run_reports_latencies_and_throughput(llm_server: ServiceProcess) -> None:
    figures = main(["--base-url", llm_server.url, "--endpoint", "completions", "--num-requests", "6",
                    "--concurrency", "3", "--input-len", "16", "--output-len", "8",
                    "--slo-ttft-ms", "60000", "--request-rate", "50", "--burstiness", "0.5",
                    "--temperature", "1"])  # sampled, as a client that sets no temperature is
    summary = figures["target"]["c3"]
    assert summary["completed"] == 6 and summary["failed"] == summary["unfinished"] == 0
    assert 6 * 4 <= summary["output_tokens"] <= 6 * 12  # lengths vary by ±50% around 8
    assert summary["output_throughput_tok_s"] > 0 and summary["goodput_rps"] > 0
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert 0 < summary[metric]["p50"] <= summary[metric]["p99"]
