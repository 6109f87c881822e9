"""Run the four services as background processes on loopback, with the bundled CPU models (no Docker).

    python scripts/stack.py up        start embed, rerank and llm together, then the retriever; wait until ready
    python scripts/stack.py status    which services run and answer ready
    python scripts/stack.py down      SIGTERM every service, SIGKILL what is left after a deadline

Logs go to `<run-dir>/logs/<service>.log`, PIDs and ports to `<run-dir>/pids.json`, the retriever's index to
`<run-dir>/data/retriever`. The run folder defaults to `run/` at the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN_DIR = ROOT / "run"
SERVICES = ("embed", "rerank", "llm", "retriever")
# Offsets from the base port that reproduce SPEC §4 for base 8000: llm 8000, embed 8001, rerank 8002, retriever 8080.
PORT_OFFSETS = {"llm": 0, "embed": 1, "rerank": 2, "retriever": 80}
# The retriever needs the other three to be ready; those three load their models in parallel.
START_WAVES = (("embed", "rerank", "llm"), ("retriever",))
RETRIEVER_DEPENDENCIES = {"embed": "RETRIEVER_EMBED_URL", "rerank": "RETRIEVER_RERANK_URL", "llm": "RETRIEVER_LLM_URL"}
LOG_TAIL_LINES = 40


class StackError(RuntimeError):
    """A failure the launcher reports in one line and exits 1 on."""


@dataclass(slots=True)
class RunningService:
    """What `pids.json` records about one started service."""

    name: str
    pid: int
    port: int
    log: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class RunFolder:
    """The run folder: logs, the PID file and the retriever's data."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.logs = path / "logs"
        self.pid_file = path / "pids.json"
        self.retriever_data = path / "data" / "retriever"

    def load(self) -> list[RunningService]:
        if not self.pid_file.exists():
            return []
        return [RunningService(**entry) for entry in json.loads(self.pid_file.read_text())["services"]]

    def save(self, services: Iterable[RunningService]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        body = {"services": [asdict(service) for service in services]}
        # Write then rename so a crash never leaves a half-written PID file behind.
        tmp = self.pid_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        tmp.replace(self.pid_file)

    def forget(self) -> None:
        self.pid_file.unlink(missing_ok=True)


def is_our_process(service: RunningService) -> bool:
    """True when the PID is alive and still runs `services.<name>` (PIDs get reused after a crash)."""
    try:
        os.kill(service.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{service.pid}/cmdline")
    if cmdline.exists():
        try:
            return f"services.{service.name}" in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            return False
    return True


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.exists():
        return "(no log written)"
    # Our own readiness probes fill the access log; the cause of a failure is in the other lines.
    kept = [line for line in path.read_text(errors="replace").splitlines() if "/v1/health/" not in line]
    return "\n".join(kept[-lines:])


def service_env(name: str, ports: dict[str, int], run: RunFolder) -> dict[str, str]:
    """The environment of one service: the caller's env, then loopback host/port, then the retriever's wiring."""
    prefix = name.upper()
    env = {**os.environ, f"{prefix}_HOST": "127.0.0.1", f"{prefix}_PORT": str(ports[name]), "PYTHONUNBUFFERED": "1"}
    # The local stack runs on the bundled models; never reach for a model hub unless the user says so.
    env.setdefault("HF_HUB_OFFLINE", "1")
    if name == "retriever":
        for dependency, variable in RETRIEVER_DEPENDENCIES.items():
            env[variable] = f"http://127.0.0.1:{ports[dependency]}"
        env.setdefault("RETRIEVER_DATA_DIR", str(run.retriever_data))
    return env


def start_service(name: str, ports: dict[str, int], run: RunFolder) -> RunningService:
    if not (ROOT / "services" / name / "__main__.py").exists():
        raise StackError(f"services/{name}/__main__.py does not exist; cannot start {name}")
    if port_in_use(ports[name]):
        raise StackError(f"port {ports[name]} for {name} is already in use (another stack running? try `down`)")
    run.logs.mkdir(parents=True, exist_ok=True)
    log_path = run.logs / f"{name}.log"
    with log_path.open("wb") as log:
        # A new session detaches the service from this terminal, so it outlives `up` and ignores its Ctrl-C.
        process = subprocess.Popen([sys.executable, "-m", f"services.{name}"], cwd=ROOT,
                                   env=service_env(name, ports, run), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    return RunningService(name=name, pid=process.pid, port=ports[name], log=str(log_path))


def probe_ready(service: RunningService) -> bool:
    try:
        return httpx.get(service.url + "/v1/health/ready", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def process_exited(service: RunningService) -> int | None:
    """The exit status when the (child) process has ended, else None; reaps it so it leaves no zombie."""
    try:
        pid, status = os.waitpid(service.pid, os.WNOHANG)
    except ChildProcessError:
        return None if is_our_process(service) else -1
    return os.waitstatus_to_exitcode(status) if pid else None


def wait_ready(services: list[RunningService], timeout: float, started: float) -> None:
    """Block until every service answers ready, printing one line per service as it does."""
    pending = {service.name: service for service in services}
    deadline = time.monotonic() + timeout
    while pending:
        for name, service in list(pending.items()):
            status = process_exited(service)
            if status is not None:
                raise StackError(f"{name} exited with status {status} before it was ready; "
                                 f"last lines of {service.log}:\n{log_tail(Path(service.log))}")
            if probe_ready(service):
                print(f"  {name:<10} ready on {service.url} in {time.monotonic() - started:.1f}s", flush=True)
                del pending[name]
        if not pending:
            return
        if time.monotonic() > deadline:
            details = "\n".join(f"--- last lines of {s.log}:\n{log_tail(Path(s.log))}" for s in pending.values())
            raise StackError(f"{', '.join(pending)} not ready after {timeout:.0f}s\n{details}")
        time.sleep(0.5)


def stop_services(services: Iterable[RunningService], grace: float) -> None:
    """SIGTERM each live service's process group, then SIGKILL whatever is still there after `grace` seconds."""
    alive = [service for service in services if is_our_process(service)]
    for service in alive:
        print(f"  stopping {service.name} (pid {service.pid})", flush=True)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(service.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        alive = [service for service in alive if process_exited(service) is None and is_our_process(service)]
        time.sleep(0.2)
    for service in alive:
        print(f"  {service.name} did not stop in {grace:.0f}s; killing it", flush=True)
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(service.pid, signal.SIGKILL)
        process_exited(service)


def port_map(base_port: int) -> dict[str, int]:
    return {name: base_port + offset for name, offset in PORT_OFFSETS.items()}


def up(run: RunFolder, names: list[str], base_port: int, timeout: float, grace: float) -> None:
    running = [service for service in run.load() if is_our_process(service)]
    if running:
        listed = ", ".join(f"{s.name} (pid {s.pid})" for s in running)
        raise StackError(f"a stack is already running from {run.path}: {listed}; run `down` first")
    ports = port_map(base_port)
    busy = [f"{name} ({ports[name]})" for name in names if port_in_use(ports[name])]
    if busy:
        raise StackError(f"ports already in use: {', '.join(busy)} (another stack running? try `down` or --base-port)")
    started_services: list[RunningService] = []
    started = time.monotonic()
    print(f"starting {', '.join(names)}; logs in {run.logs}", flush=True)
    try:
        for wave in START_WAVES:
            batch: list[RunningService] = []
            for name in (name for name in wave if name in names):
                batch.append(start_service(name, ports, run))
                started_services.append(batch[-1])
                run.save(started_services)
            wait_ready(batch, timeout, started)
    except BaseException:
        # Leave nothing half-started behind: a stack is either fully up or not running at all.
        print("start failed; stopping the services already started", file=sys.stderr, flush=True)
        stop_services(started_services, grace)
        run.forget()
        raise
    print(f"stack ready in {time.monotonic() - started:.1f}s", flush=True)
    for service in started_services:
        print(f"  {service.name:<10} {service.url}", flush=True)


def down(run: RunFolder, grace: float) -> None:
    services = run.load()
    if not services:
        print(f"no stack recorded in {run.pid_file}; nothing to stop", flush=True)
        return
    stop_services(services, grace)
    run.forget()
    print("stack stopped", flush=True)


def status(run: RunFolder) -> bool:
    """Print one line per recorded service; True when every one of them runs and is ready."""
    services = run.load()
    if not services:
        print(f"no stack recorded in {run.pid_file}", flush=True)
        return False
    healthy = True
    for service in services:
        if not is_our_process(service):
            state, healthy = "not running", False
        elif probe_ready(service):
            state = "ready"
        else:
            state, healthy = "running, not ready", False
        print(f"  {service.name:<10} pid {service.pid:<8} {service.url:<24} {state}", flush=True)
    return healthy


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Service settings (models, limits) come from the usual LLM_*/EMBED_*/RERANK_*/RETRIEVER_* env vars; "
               "HF_HUB_OFFLINE defaults to 1.")
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR,
                        help="folder for logs, pids.json and the retriever's data [default: %(default)s]")
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("STACK_BASE_PORT", "8000")),
                        help="llm on BASE, embed BASE+1, rerank BASE+2, retriever BASE+80 "
                             "[default: env STACK_BASE_PORT or 8000]")
    parser.add_argument("--services", default=",".join(SERVICES),
                        help="comma-separated subset to start [default: %(default)s]")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds each start wave may take to become ready [default: %(default)s]")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds between SIGTERM and SIGKILL on stop [default: %(default)s]")
    args = parser.parse_args(argv)
    args.services = [name.strip() for name in args.services.split(",") if name.strip()]
    unknown = sorted(set(args.services) - set(SERVICES))
    if unknown or not args.services:
        parser.error(f"--services must name some of {', '.join(SERVICES)}; unknown: {', '.join(unknown) or '-'}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = RunFolder(args.run_dir.resolve())
    try:
        if args.command == "up":
            up(run, args.services, args.base_port, args.timeout, args.grace)
        elif args.command == "down":
            down(run, args.grace)
        else:
            return 0 if status(run) else 1
    except StackError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
