"""Start services as real `python -m services.<name>` processes on loopback and wait until they are ready."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServiceProcess:
    """One service process; `url` is its base URL. Logs go to `log_path`."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    log_dir: Path | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        prefix = self.name.upper()
        env = {**os.environ, f"{prefix}_HOST": "127.0.0.1", f"{prefix}_PORT": str(self.port),
               "PYTHONUNBUFFERED": "1", **self.env}
        log_dir = self.log_dir or Path(os.environ.get("TMPDIR", "/tmp"))
        self.log_path = log_dir / f"{self.name}-{self.port}.log"
        log = self.log_path.open("ab")  # a restarted service keeps its earlier log
        self.process = subprocess.Popen([sys.executable, "-m", f"services.{self.name}"], cwd=ROOT, env=env,
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def wait_live(self, timeout: float = 60.0) -> ServiceProcess:
        return self._wait("/v1/health/live", timeout)

    def wait_ready(self, timeout: float = 180.0) -> ServiceProcess:
        return self._wait("/v1/health/ready", timeout)

    def _wait(self, path: str, timeout: float) -> ServiceProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.logs()}")
            try:
                if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{self.name} not {path} after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextmanager
def running_stack(log_dir: Path, env: dict[str, str] | None = None,
                  timeout: float = 600.0) -> Iterator[dict[str, ServiceProcess]]:
    """llm, embed and rerank, plus a retriever pointed at them (index in `log_dir/data`), all ready; stopped after."""
    common = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    processes = {name: ServiceProcess(name, env=dict(common), log_dir=log_dir) for name in ("llm", "embed", "rerank")}
    retriever_env = {**common, "RETRIEVER_DATA_DIR": str(log_dir / "data"),
                     **{f"RETRIEVER_{n.upper()}_URL": p.url for n, p in processes.items()}}
    processes["retriever"] = ServiceProcess("retriever", env=retriever_env, log_dir=log_dir)
    try:
        for process in processes.values():
            process.start()
        for process in processes.values():
            process.wait_ready(timeout)
        yield processes
    finally:
        for process in reversed(processes.values()):
            process.stop()
