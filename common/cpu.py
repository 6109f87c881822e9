"""What the CPU under a service computes natively, for the services that pick their torch dtype from it.

bf16 pays only on cores with bf16 matrix instructions (AMX or AVX512-BF16): there oneDNN's bf16 GEMMs are several
times faster than fp32. oneDNN also runs bf16 on plain AVX512, emulated and slower than fp32, so its own check
(`torch.ops.mkldnn._is_mkldnn_bf16_supported`) is not enough on its own.
"""

from __future__ import annotations

# /proc/cpuinfo flags of x86 cores with native bf16 matrix math.
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matrix instructions and this torch's oneDNN has bf16 kernels for them."""
    import torch

    return (bool(cpu_flags() & CPU_BF16_FLAGS) and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())
