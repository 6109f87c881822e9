"""What the engine runs on, detected once at start-up, and the kernel profile chosen for it.

Like a NIM profile, the choice is made from the device, not configured by hand: on a CUDA GPU the Triton
kernels, bf16 where the GPU has it (compute capability ≥ 8.0, else fp16), CUDA graphs for decode; on the
CPU the torch path, in bf16 where the cores have bf16 matrix instructions (AMX or AVX512-BF16: oneDNN's bf16
GEMMs are several times faster than fp32 there, and the weights take half the memory traffic), else fp32.
Use it in the engine's start-up:

    profile = detect_hardware(config.device)
    log.info("hardware profile %s", profile.describe())
    model = load(..., dtype=profile.dtype); pool = KVPool(block_size=profile.kv_block_size, ...)
    if profile.use_cuda_graphs: runner = DecodeGraphRunner(...)   # see cuda_graphs.py

`describe()` is a JSON-ready dict for logs and the `/v1/models` metadata. `LLM_DISABLE_TRITON=1` forces
the torch references (and is honoured by `dispatch.use_triton`, so both agree).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from common.cpu import CPU_BF16_FLAGS, cpu_flags
from services.llm.kernels.dispatch import triton_available

# Triton's tensor-core paths need Ampere or newer for bf16; Turing/Volta still run them in fp16.
_MIN_TRITON_CAPABILITY = (7, 5)
_BF16_CAPABILITY = (8, 0)
# fp8 e4m3 (weights and the KV cache) needs Ada or Hopper: Triton has no e4m3 conversions below sm_89.
FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    device: str
    name: str
    compute_capability: tuple[int, int] | None
    total_memory_bytes: int
    multiprocessor_count: int
    supports_bf16: bool
    dtype: torch.dtype
    kernels: str  # "triton" or "torch"
    kv_block_size: int
    use_cuda_graphs: bool

    @property
    def supports_fp8(self) -> bool:
        """Whether fp8 e4m3 weights and KV cache can run: on the CPU through torch, on GPUs from sm_89."""
        return self.compute_capability is None or self.kernels != "triton" or self.compute_capability >= FP8_CAPABILITY

    @property
    def profile(self) -> str:
        """A short name for the choice, e.g. `cuda-sm90-bf16-triton` or `cpu-fp32-torch`."""
        dtype = str(self.dtype).removeprefix("torch.").replace("bfloat16", "bf16").replace("float", "fp")
        where = "cpu" if self.compute_capability is None else "cuda-sm{}{}".format(*self.compute_capability)
        return f"{where}-{dtype}-{self.kernels}"

    def describe(self) -> dict[str, object]:
        return {
            "profile": self.profile,
            "device": self.device,
            "name": self.name,
            "compute_capability": ".".join(map(str, self.compute_capability)) if self.compute_capability else None,
            "memory_gib": round(self.total_memory_bytes / 2**30, 1),
            "multiprocessors": self.multiprocessor_count,
            "bf16": self.supports_bf16,
            "dtype": str(self.dtype).removeprefix("torch."),
            "kernels": self.kernels,
            "kv_block_size": self.kv_block_size,
            "cuda_graphs": self.use_cuda_graphs,
        }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def cpu_default_dtype(flags: set[str]) -> torch.dtype:
    """bf16 on cores with bf16 matrix instructions, fp32 elsewhere (bf16 is emulated, and slower, there)."""
    return torch.bfloat16 if flags & CPU_BF16_FLAGS else torch.float32


def _cpu_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def usable_cores() -> set[int]:
    """The CPU cores this process may run on: its affinity (a container's cpuset, say), else all of them."""
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def use_given_cores() -> int:
    """Torch's CPU threads = the cores this process may run on (its affinity, e.g. a container's cpuset),
    unless OMP_NUM_THREADS says otherwise; torch alone counts the host's cores. Returns the thread count."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(len(usable_cores()))
    return torch.get_num_threads()


def detect_hardware(device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> HardwareProfile:
    """The profile for `device` (default: the first GPU if there is one, else the CPU). `dtype` overrides the
    chosen dtype, e.g. fp32 on a GPU for debugging; bf16 is refused where the GPU lacks it."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    target = torch.device(device)
    if target.type != "cuda":
        flags = cpu_flags()
        return HardwareProfile(device="cpu", name=_cpu_name(), compute_capability=None,
                               total_memory_bytes=_cpu_memory_bytes(), multiprocessor_count=len(usable_cores()),
                               supports_bf16=bool(flags & CPU_BF16_FLAGS), dtype=dtype or cpu_default_dtype(flags),
                               kernels="torch", kv_block_size=16, use_cuda_graphs=False)
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {target} requested but CUDA is not available")
    index = target.index if target.index is not None else torch.cuda.current_device()
    return cuda_profile(index, torch.cuda.get_device_properties(index), dtype)


def cuda_profile(index: int, props: Any, dtype: torch.dtype | None = None) -> HardwareProfile:
    """The profile of GPU `index` with these properties (the fields of `torch.cuda.get_device_properties`: name,
    major, minor, total_memory, multi_processor_count), so tests can stand in GPUs they don't have."""
    capability = (props.major, props.minor)
    bf16 = capability >= _BF16_CAPABILITY
    if dtype == torch.bfloat16 and not bf16:
        raise ValueError(f"{props.name} (sm{props.major}{props.minor}) has no bf16 support; use float16")
    triton = triton_available() and capability >= _MIN_TRITON_CAPABILITY
    return HardwareProfile(
        device=f"cuda:{index}", name=props.name, compute_capability=capability,
        total_memory_bytes=props.total_memory, multiprocessor_count=props.multi_processor_count,
        supports_bf16=bf16, dtype=dtype or (torch.bfloat16 if bf16 else torch.float16),
        kernels="triton" if triton else "torch", kv_block_size=16, use_cuda_graphs=True,
    )
