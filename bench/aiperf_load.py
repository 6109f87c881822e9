"""NVIDIA's aiperf as the load generator for bench/llm_serve.py: one `aiperf profile` run per concurrency.

aiperf is installed on first use into its own venv under `.bench/` (its dependencies do not mix with ours).
Every server gets the same synthetic workload: prompts of `input_tokens` tokens (counted with the model's own
tokenizer), `output_tokens` tokens out with `ignore_eos`, at `temperature` (0: greedy), streamed chat
completions, and the same number of untimed warm-up requests. aiperf counts tokens itself, with the same
tokenizer on both sides.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.llm_servers import RunningServer, ensure_venv

AIPERF_VERSION = "0.13.0"
SUMMARY_FILE = "profile_export_aiperf.json"
# The figures the bench reports from aiperf's summary, in its metric names.
METRICS = {"output_token_throughput": "output_tok_s", "request_throughput": "requests_per_s",
           "time_to_first_token": "ttft_ms", "inter_token_latency": "itl_ms",
           "request_latency": "e2e_ms", "output_sequence_length": "output_tokens_per_request"}


@dataclass(slots=True, frozen=True)
class AiperfLoad:
    concurrency: int
    request_count: int
    warmup_request_count: int
    input_tokens: int
    input_tokens_stddev: int
    output_tokens: int
    seed: int = 0
    temperature: float = 0.0
    # None: aiperf's concurrency mode, which fills a freed slot at once but busy-polls for one while all are taken
    # (about a core of the client's). A rate: requests at most this often, evenly spaced, under the same cap.
    request_rate: float | None = None


def aiperf_executable() -> Path:
    return ensure_venv("aiperf", [f"aiperf=={AIPERF_VERSION}"]) / "bin" / "aiperf"


def aiperf_command(server: RunningServer, load: AiperfLoad, tokenizer_dir: Path, artifact_dir: Path) -> list[str]:
    return [str(aiperf_executable()), "profile",
            "--model", server.model, "--url", server.url, "--endpoint-type", "chat", "--streaming",
            "--tokenizer", str(tokenizer_dir),
            "--concurrency", str(load.concurrency), "--request-count", str(load.request_count),
            "--warmup-request-count", str(load.warmup_request_count),
            "--synthetic-input-tokens-mean", str(load.input_tokens),
            "--synthetic-input-tokens-stddev", str(load.input_tokens_stddev),
            "--output-tokens-mean", str(load.output_tokens), "--output-tokens-stddev", "0",
            "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"temperature:{load.temperature:g}",
            "--random-seed", str(load.seed), "--ui-type", "none", "--artifact-dir", str(artifact_dir),
            # Few client processes: on a small machine they take cores from the server under test.
            "--workers-max", "1", "--record-processors", "1", "--no-server-metrics", "--no-gpu-telemetry",
            *(["--request-rate", f"{load.request_rate:g}", "--arrival-pattern", "constant"]
              if load.request_rate else [])]


def run_aiperf(server: RunningServer, load: AiperfLoad, tokenizer_dir: Path, artifact_dir: Path,
               log_path: Path) -> dict[str, object]:
    """Runs one aiperf profile against `server`; returns the reported figures and where the export lies."""
    shutil.rmtree(artifact_dir, ignore_errors=True)
    artifact_dir.mkdir(parents=True)
    command = aiperf_command(server, load, tokenizer_dir, artifact_dir)
    print(f"aiperf: {server.name}, concurrency {load.concurrency}, {load.request_count} requests")
    # aiperf's offline mode looks tokenizers up in the hub cache only; a local directory loads without the hub.
    env = {name: value for name, value in os.environ.items() if name != "HF_HUB_OFFLINE"}
    with log_path.open("wb") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
    summaries = sorted(artifact_dir.rglob(SUMMARY_FILE))
    if finished.returncode != 0 or not summaries:
        raise RuntimeError(f"aiperf failed (exit {finished.returncode}) against {server.name}:\n"
                           f"{log_path.read_text()[-3000:]}")
    return {"load": asdict(load), "export": str(summaries[0]), **read_summary(summaries[0])}


def read_summary(path: Path) -> dict[str, object]:
    """The bench's figures from an aiperf summary export (avg/p50/p99 per latency metric)."""
    export = json.loads(path.read_text())
    records = export.get("records", export)
    figures: dict[str, object] = {}
    for name, ours in METRICS.items():
        record = records.get(name)
        if not isinstance(record, dict):
            continue
        stats = {key: record[key] for key in ("avg", "p50", "p90", "p99") if record.get(key) is not None}
        figures[ours] = stats if len(stats) > 1 else stats.get("avg")
    for key in ("error_request_count", "request_count"):
        record = records.get(key)
        if isinstance(record, dict):
            figures[key] = record.get("avg")
    return figures
