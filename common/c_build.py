"""Builds the CPU C kernels (the LLM's under `services/llm/kernels`, and `common/dense_attention_cpu.c`) at first
use, for ctypes to load.

Each is compiled with the system C compiler (`$CC`, else `cc`) into a per-user cache directory, under a name
keyed by the source (with its headers and `common/amx.h`, which the AMX kernels share and which is on every
kernel's include path), the compiler, the flags and the CPU, so a change to any of them rebuilds; the build goes
to a temporary file renamed into place, so engines starting together never load a half-written library.
`CHOICES` are the values of the settings that pick a kernel or its torch path (`resolve`).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from common.cpu import cpu_flags

CHOICES = ("auto", "kernel", "torch")
FLAGS = ("-O3", "-march=native", "-std=gnu11", "-shared", "-fPIC")
INCLUDE_DIR = Path(__file__).parent  # amx.h
AMX_FLAGS = frozenset({"amx_tile", "amx_bf16", "avx512_bf16"})  # /proc/cpuinfo flags the AMX kernels run on

Kernel = TypeVar("Kernel")

log = logging.getLogger(__name__)


class KernelBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rag-platform" / "kernels"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def build(source: Path, flags: tuple[str, ...], compiler: str | None = None, directory: Path | None = None) -> Path:
    """The source's shared library, compiled now unless this source (with the headers beside it), compiler, flags
    and CPU built it before."""
    compiler = compiler or os.environ.get("CC") or "cc"
    directory = directory or cache_dir()
    headers = sorted({*source.parent.glob("*.h"), *INCLUDE_DIR.glob("*.h")})
    texts = [source.read_text(), *(header.read_text() for header in headers)]
    key = hashlib.sha256("\0".join([*texts, compiler, *flags, platform.machine(), _cpu_model()])
                         .encode()).hexdigest()[:16]
    library = directory / f"{source.stem}-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        result = subprocess.run([compiler, *flags, f"-I{INCLUDE_DIR}", str(source), "-o", partial, "-lm"],
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        os.unlink(partial)
        raise KernelBuildError(f"{compiler}: {exc}") from exc
    if result.returncode != 0:
        os.unlink(partial)
        raise KernelBuildError(f"{compiler} exited {result.returncode}: {result.stderr.strip()[-2000:]}")
    os.replace(partial, library)  # atomic: a concurrent start sees the old name absent or the whole library
    return library


def load_amx_library(source: Path, flags: tuple[str, ...], compiler: str | None = None,
                     directory: Path | None = None) -> ctypes.CDLL:
    """An AMX kernel's library (one that includes `amx.h`), built and opened. Raises `KernelBuildError` where the
    CPU has no AMX bf16 (before building), the build fails, or it has no AMX code or Linux does not grant the
    process the AMX tile state (its `amx_available()`)."""
    missing = AMX_FLAGS - cpu_flags()
    if missing:
        raise KernelBuildError(f"the CPU lacks {', '.join(sorted(missing))}")
    library = ctypes.CDLL(str(build(source, flags, compiler, directory)))
    library.amx_available.restype = ctypes.c_int
    if not library.amx_available():
        raise KernelBuildError("the compiler built no AMX code here, or Linux refused this process the AMX tile "
                               "state")
    return library


def resolve(choice: str, load: Callable[[], Kernel], shared: Callable[[], Kernel | None]) -> Kernel | None:
    """A setting's kernel: `kernel` requires the build (raises `KernelBuildError`), `auto` is `shared()` (the
    process's kernel, or None with one warning where it does not build), `torch` is None."""
    if choice not in CHOICES:
        raise ValueError(f"unknown CPU kernel choice {choice!r}; choose one of {CHOICES}")
    if choice == "torch":
        return None
    if choice == "kernel":
        return load()
    return shared()


def load_or_warn(load: Callable[[], Kernel], fallback: str) -> Kernel | None:
    """`load()`, or None with one warning (`fallback`: what runs instead) where the kernel does not build."""
    try:
        return load()
    except (KernelBuildError, OSError) as exc:
        log.warning("%s: %s", fallback, exc)
        return None
