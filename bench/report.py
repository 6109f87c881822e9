"""The result file every benchmark writes (SPEC §7) and the table it prints.

`bench/results/<name>-<device>-<date>.json` holds the command, git commit, device, library versions,
the workload, our figures, the peer's figures from the same run, and the hardware limit where one applies.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# BENCH_RESULTS_DIR sends the files elsewhere (bench/gpu_check.sh collects a GPU run's results in its OUTDIR).
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results")
LIBRARIES = ("torch", "transformers", "sentence-transformers", "faiss-cpu", "faiss-gpu", "triton", "numpy",
             "fastapi", "uvicorn")


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=REPO)
        # A bench's own outputs (bench/results/, written during the run) do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], capture_output=True, text=True, cwd=REPO).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def require_clean_tree() -> None:
    """Results are evidence only when they come from committed code: stop before running otherwise."""
    commit = git_commit()
    if commit.endswith("-dirty") or commit == "unknown":
        raise SystemExit(f"refusing to save a result from {commit}: commit your changes first "
                         "(or pass --allow-dirty for a result that will not be committed)")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:40]


def save_result(name: str, *, workload: dict, ours: object, peer: object, limit: object = None,
                extra: dict | None = None) -> Path:
    device = device_name()
    record = {
        "name": name,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device,
        "cpu_count": _cpu_count(),
        "libraries": library_versions(),
        "workload": workload,
        "ours": ours,
        "peer": peer,
        "hardware_limit": limit,
        **(extra or {}),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{_slug(device)}-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def print_table(title: str, header: list[str], rows: list[list[object]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)
