"""`scripts/stack.py`: the local stack comes up ready, reports its state, and goes down leaving nothing behind."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "scripts" / "stack.py"
SERVICES = ("llm", "embed", "rerank", "retriever")
PORT_OFFSETS = {"llm": 0, "embed": 1, "rerank": 2, "retriever": 80}
MISSING = [name for name in SERVICES if not (ROOT / "services" / name / "__main__.py").exists()]

needs_all_services = pytest.mark.skipif(
    bool(MISSING), reason=f"services without a __main__.py yet: {', '.join(MISSING)}")
needs_embed = pytest.mark.skipif("embed" in MISSING, reason="services/embed/__main__.py does not exist yet")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port() -> int:
    """A base port whose four stack ports (base, +1, +2, +80) are all free, away from the default 8000 range."""
    for _ in range(200):
        base = random.randrange(20_000, 40_000)
        if all(port_free(base + offset) for offset in PORT_OFFSETS.values()):
            return base
    raise RuntimeError("no free base port found")


def stack(command: str, run_dir: Path, *args: str, env: dict[str, str] | None = None,
          timeout: float = 900) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(STACK), command, "--run-dir", str(run_dir), *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie (a zombie has an empty cmdline)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    return not cmdline.exists() or bool(cmdline.read_bytes())


def wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while any(pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if pid_alive(pid)]


def recorded(run_dir: Path) -> dict[str, dict]:
    return {entry["name"]: entry for entry in json.loads((run_dir / "pids.json").read_text())["services"]}


def test_help_lists_the_commands() -> None:
    result = subprocess.run([sys.executable, str(STACK), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for word in ("up", "down", "status", "--base-port", "--services", "--run-dir"):
        assert word in result.stdout


def test_down_and_status_without_a_stack(tmp_path: Path) -> None:
    result = stack("down", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "nothing to stop" in result.stdout
    assert stack("status", tmp_path).returncode == 1


def test_unknown_service_is_a_usage_error(tmp_path: Path) -> None:
    result = stack("up", tmp_path, "--services", "embed,vectordb")
    assert result.returncode == 2
    assert "vectordb" in result.stderr


def test_up_refuses_busy_ports_and_starts_nothing(tmp_path: Path) -> None:
    base = free_base_port()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", base + PORT_OFFSETS["rerank"]))
        squatter.listen()
        result = stack("up", tmp_path, "--services", "embed,rerank", "--base-port", str(base))
    assert result.returncode == 1
    assert f"rerank ({base + PORT_OFFSETS['rerank']})" in result.stderr
    assert not (tmp_path / "pids.json").exists()
    assert port_free(base + PORT_OFFSETS["embed"])


@needs_embed
def test_down_after_a_crash(tmp_path: Path) -> None:
    """One service killed behind the launcher's back: status says so, and down still cleans up."""
    base = free_base_port()
    up = stack("up", tmp_path, "--services", "embed", "--base-port", str(base), "--timeout", "300")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "embed" in up.stdout and "ready" in up.stdout
    embed = recorded(tmp_path)["embed"]
    try:
        assert stack("status", tmp_path).returncode == 0
        again = stack("up", tmp_path, "--services", "embed", "--base-port", str(base))
        assert again.returncode == 1 and "already running" in again.stderr

        os.kill(embed["pid"], signal.SIGKILL)
        assert wait_gone([embed["pid"]]) == []
        status = stack("status", tmp_path)
        assert status.returncode == 1 and "not running" in status.stdout
    finally:
        down = stack("down", tmp_path)
    assert down.returncode == 0, down.stderr
    assert not (tmp_path / "pids.json").exists()
    assert port_free(embed["port"])


@needs_embed
def test_a_service_that_never_gets_ready_stops_the_stack(tmp_path: Path) -> None:
    base = free_base_port()
    missing_model = tmp_path / "no-such-model"
    result = stack("up", tmp_path, "--services", "embed", "--base-port", str(base), "--timeout", "30",
                   env={"EMBED_MODEL": str(missing_model)})
    assert result.returncode == 1
    # The log tail names the cause, not just "timed out".
    assert str(missing_model) in result.stderr
    assert not (tmp_path / "pids.json").exists()
    assert port_free(base + PORT_OFFSETS["embed"])


@pytest.mark.slow
@needs_all_services
def test_up_all_ready_then_down_leaves_nothing(tmp_path: Path) -> None:
    base = free_base_port()
    up = stack("up", tmp_path, "--base-port", str(base), "--timeout", "600")
    services: dict[str, dict] = {}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        services = recorded(tmp_path)
        assert set(services) == set(SERVICES)
        for name in SERVICES:
            port = base + PORT_OFFSETS[name]
            assert services[name]["port"] == port
            ready = httpx.get(f"http://127.0.0.1:{port}/v1/health/ready", timeout=5)
            assert ready.status_code == 200 and ready.json()["ready"] is True, name
            assert (tmp_path / "logs" / f"{name}.log").exists()
        # Embed, rerank and llm start together; the retriever only after them.
        ready_order = re.findall(r"^\s+(\w+)\s+ready on", up.stdout, flags=re.MULTILINE)
        assert sorted(ready_order) == sorted(SERVICES) and ready_order[-1] == "retriever", up.stdout
        status = stack("status", tmp_path)
        assert status.returncode == 0 and status.stdout.count("ready") == 4
    finally:
        down = stack("down", tmp_path)
    assert down.returncode == 0, down.stderr
    assert wait_gone([entry["pid"] for entry in services.values()]) == []
    assert not (tmp_path / "pids.json").exists()
    for name in SERVICES:
        assert port_free(base + PORT_OFFSETS[name]), name
