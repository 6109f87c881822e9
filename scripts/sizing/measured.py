"""Measured points: TTFT, ITL and throughput at one concurrency, read from the load tests we save.

Two formats are read:
- aiperf's summary export (`profile_export_aiperf.json`, any file name): one metric block per tag
  (`time_to_first_token`, `inter_token_latency`, `request_throughput`, ...) with `unit`, `avg` and percentiles;
  the concurrency comes from `input_config` (the profiling phase's, `loadgen.concurrency`, or any nested
  `concurrency`) or from `run_info.variation_values`;
- `bench/llm_serve.py` results (`bench/results/llm_serve-*.json`): our own side, `ours`, of each run.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

STATS = ("avg", "p50", "p90", "p95", "p99")
_SECONDS = {"s": 1.0, "sec": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@dataclass(frozen=True, slots=True)
class MeasuredPoint:
    source: str  # file it came from
    model: str
    device: str  # "" when the file does not record it
    concurrency: int
    input_tokens: float
    output_tokens: float
    ttft_s: float
    itl_s: float
    e2e_s: float
    rps: float  # requests/s of the whole measured deployment
    tp: int = 1


class NotAPoint(ValueError):
    """A load-test result that cannot be a sweep point (cancelled, rate-driven, ...)."""


class NotALoadTest(NotAPoint):
    """Some other JSON file (a benchmark of another kind, aiperf's inputs or server metrics)."""


def _seconds(block: dict, stat: str, tag: str) -> float:
    unit = str(block.get("unit", "ms")).lower()
    if unit not in _SECONDS:
        raise NotAPoint(f"{tag}: unit {unit!r} is not a time")
    value = block.get(stat, block.get("avg"))
    if value is None:
        raise NotAPoint(f"{tag}: no {stat}")
    return float(value) * _SECONDS[unit]


def _find_key(tree: object, key: str) -> object:
    if isinstance(tree, list):
        return next((found for item in tree if (found := _find_key(item, key)) is not None), None)
    if isinstance(tree, dict):
        if tree.get(key) is not None:
            return tree[key]
        return _find_key(list(tree.values()), key)
    return None


def _aiperf_concurrency(data: dict) -> int:
    """aiperf 0.13+ lists phases (warmup, profiling); older exports have `loadgen`; sweeps name it in run_info."""
    config = data.get("input_config") or {}
    phases = [p for p in config.get("phases") or [] if isinstance(p, dict)]
    profiling = [p for p in phases if "profiling" in (p.get("kind"), p.get("name"))]
    variations = (data.get("run_info") or {}).get("variation_values") or {}
    for found in ([p.get("concurrency") for p in profiling] + [(config.get("loadgen") or {}).get("concurrency")]
                  + [v for k, v in variations.items() if k.endswith("concurrency")]
                  + [_find_key(config, "concurrency")]):
        if isinstance(found, int | float) and not isinstance(found, bool) and found > 0:
            return int(found)
    raise NotAPoint("no concurrency in input_config or run_info (a request-rate run is not a sweep point)")


def _aiperf_model(data: dict) -> str:
    config = data.get("input_config") or {}
    names = (config.get("endpoint") or {}).get("model_names") or [
        item.get("name") for item in ((config.get("models") or {}).get("items") or []) if isinstance(item, dict)]
    return str(names[0]) if names else ""


def _aiperf_device(data: dict) -> str:
    for endpoint in ((data.get("telemetry_data") or {}).get("endpoints") or {}).values():
        for gpu in (endpoint.get("gpus") or {}).values():
            if gpu.get("gpu_name"):
                return str(gpu["gpu_name"])
    return ""


def from_aiperf(data: dict, source: str, stat: str = "avg") -> MeasuredPoint:
    for tag in ("time_to_first_token", "inter_token_latency", "request_throughput"):
        if not isinstance(data.get(tag), dict):
            raise NotALoadTest(f"no {tag} block (not an aiperf streaming export)")
    if data.get("was_cancelled"):
        raise NotAPoint("the run was cancelled")
    ttft = _seconds(data["time_to_first_token"], stat, "time_to_first_token")
    itl = _seconds(data["inter_token_latency"], stat, "inter_token_latency")
    osl = float((data.get("output_sequence_length") or {}).get("avg") or 0.0)
    e2e = _seconds(data["request_latency"], stat, "request_latency") if isinstance(
        data.get("request_latency"), dict) else ttft + max(osl - 1, 0) * itl
    return MeasuredPoint(
        source=source, model=_aiperf_model(data), device=_aiperf_device(data),
        concurrency=_aiperf_concurrency(data),
        input_tokens=float((data.get("input_sequence_length") or {}).get("avg") or 0.0), output_tokens=osl,
        ttft_s=ttft, itl_s=itl, e2e_s=e2e, rps=float(data["request_throughput"]["avg"]))


def from_llm_serve(data: dict, source: str, stat: str = "avg") -> MeasuredPoint:
    ours, workload = data.get("ours") or {}, data.get("workload") or {}
    if isinstance(workload.get("concurrency"), list):  # the aiperf side by side: its exports, beside it, are points
        raise NotALoadTest(f"a sweep over concurrency {workload['concurrency']}: its points are the aiperf exports "
                           f"in {Path(source).with_suffix('')}/")
    if not workload.get("concurrency"):
        raise NotAPoint("no concurrency in the workload (a rate-driven run is not a sweep point)")
    key = "mean" if stat == "avg" else stat
    completed = max(int(ours.get("completed") or 0), 1)
    return MeasuredPoint(
        source=source, model=str(workload.get("model", "")), device=str(data.get("device", "")),
        concurrency=int(workload["concurrency"]),
        input_tokens=float(workload.get("input_len") or 0), output_tokens=float(ours["output_tokens"]) / completed,
        ttft_s=ours["ttft_ms"][key] / 1e3, itl_s=ours["itl_ms"][key] / 1e3, e2e_s=ours["e2e_ms"][key] / 1e3,
        rps=float(ours["request_throughput_rps"]))


def read_point(path: Path, stat: str = "avg", data: object = None) -> MeasuredPoint:
    data = json.loads(path.read_text()) if data is None else data
    if not isinstance(data, dict):
        raise NotALoadTest("not a JSON object")
    if data.get("name", "").startswith("llm_serve") and "ours" in data:
        return from_llm_serve(data, str(path), stat)
    return from_aiperf(data, str(path), stat)


def read_points(paths: Iterable[Path], stat: str = "avg", tp: int = 1) -> tuple[list[MeasuredPoint], list[str]]:
    """Every sweep point in `paths`, run with `tp`, and why each file that looks like a load test is not one.

    Folders are searched for *.json; other kinds of JSON there are passed over quietly, and so are aiperf's
    per-phase copies (`phases/<name>/...`) of a run already read (one aiperf `benchmark_id` is one point).
    """
    points, skipped, seen = [], [], set()
    for path in paths:
        explicit = not path.is_dir()
        for file in [path] if explicit else sorted(p for p in path.rglob("*.json") if "phases" not in p.parts):
            try:
                data = json.loads(file.read_text())
                key = data.get("benchmark_id") if isinstance(data, dict) else None
                if key and key in seen:
                    continue
                points.append(replace(read_point(file, stat, data), tp=tp))
                seen.add(key)
            except NotALoadTest as exc:
                if explicit:
                    skipped.append(f"{file}: {exc}")
            except (NotAPoint, OSError, KeyError, TypeError, ValueError) as exc:
                skipped.append(f"{file}: {exc}")
    return points, skipped
