"""Device specs: memory, bandwidth, dense tensor FLOPs per precision, and the link between devices of a node."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass(frozen=True, slots=True)
class Device:
    name: str
    kind: str  # "gpu" or "cpu"
    memory_gb: float  # per device, decimal GB
    bandwidth_gbs: float  # memory bandwidth, GB/s
    tflops: dict[str, float]  # dense (no sparsity) peak per compute precision
    link_gbs: float  # per direction between devices of one node (NVLink, PCIe); 0 when there is none
    link_latency_us: float  # fixed cost of one all-reduce
    per_node: int  # devices in one node (a DGX/HGX has 8)
    kv_budget_gb: float | None = None  # fixed KV-cache size instead of "what the weights leave free"
    note: str = ""
    aliases: tuple[str, ...] = field(default=())

    def compute_precision(self, precision: str) -> str:
        """The FLOPs entry a precision runs at (weight-only int4 computes in 16-bit)."""
        wanted = {"fp16": "bf16", "int4": "bf16"}.get(precision, precision)
        if wanted not in self.tflops:
            raise ValueError(f"{self.name} has no {precision} compute; it has {', '.join(self.tflops)}")
        return wanted

    def kv_budget_bytes(self, weight_bytes_per_device: float, memory_utilization: float) -> float:
        if self.kv_budget_gb is not None:
            return self.kv_budget_gb * 1e9
        return self.memory_gb * 1e9 * memory_utilization - weight_bytes_per_device


def _local_cpu() -> Device:
    # Nominal figures for a small x86 server; --measured calibrates them, and the report says when it did not.
    return Device(name="cpu", kind="cpu", memory_gb=psutil.virtual_memory().total / 1e9, bandwidth_gbs=20.0,
                  tflops={"fp32": 0.2, "bf16": 0.4}, link_gbs=0.0, link_latency_us=0.0, per_node=1,
                  kv_budget_gb=2**30 / 1e9, note="nominal figures; KV budget is LLM_KV_CACHE_GIB's default 1 GiB",
                  aliases=("laptop",))


# Vendor datasheets (SXM parts; dense tensor-core FLOPs without sparsity; NVLink per direction = half the
# quoted bidirectional figure).
BUILTIN_DEVICES: dict[str, Device] = {d.name: d for d in (
    Device("h100-sxm", "gpu", 80, 3350, {"bf16": 989, "fp8": 1979}, 450, 8, 8, aliases=("h100", "dgx-h100")),
    Device("h200", "gpu", 141, 4800, {"bf16": 989, "fp8": 1979}, 450, 8, 8, aliases=("h200-sxm", "dgx-h200")),
    Device("a100-80g", "gpu", 80, 2039, {"bf16": 312}, 300, 10, 8, aliases=("a100", "a100-sxm", "dgx-a100")),
    Device("l40s", "gpu", 48, 864, {"bf16": 362, "fp8": 733}, 32, 25, 8, note="no NVLink: PCIe Gen4 x16"),
)}


def load_device(spec: str) -> Device:
    """A built-in name, `cpu`, or a JSON file with the Device fields (a measured profile of your own machine)."""
    key = spec.lower()
    if key in ("cpu", "laptop"):
        return _local_cpu()
    for device in BUILTIN_DEVICES.values():
        if key == device.name or key in device.aliases:
            return device
    path = Path(spec)
    if path.is_file():
        data = json.loads(path.read_text())
        data.setdefault("kind", "gpu")
        data.setdefault("link_gbs", 0.0)
        data.setdefault("link_latency_us", 10.0)
        data.setdefault("per_node", 1)
        data["aliases"] = tuple(data.get("aliases", ()))
        return Device(**data)
    raise ValueError(f"unknown device {spec!r}: give a JSON profile or one of: cpu, {', '.join(BUILTIN_DEVICES)}")
