"""Choosing configurations: the limits, the Pareto front, the throughput- and latency-optimal points, the fleet."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .roofline import Estimate


@dataclass(frozen=True, slots=True)
class Limits:
    max_ttft_s: float | None = None
    max_itl_s: float | None = None
    max_e2e_s: float | None = None
    mode: str = "streaming"  # "streaming": the user reads tokens as they come; "sequential": waits for all

    def __post_init__(self) -> None:
        assert self.mode in ("streaming", "sequential"), self.mode

    def bounds(self) -> dict[str, float]:
        """The limits that apply: a sequential client sees only the end-to-end latency."""
        wanted = {"e2e_s": self.max_e2e_s}
        if self.mode == "streaming":
            wanted |= {"ttft_s": self.max_ttft_s, "itl_s": self.max_itl_s}
        return {key: value for key, value in wanted.items() if value is not None}

    def excess(self, point: Estimate) -> float:
        """The worst ratio of a latency to its limit: <= 1 inside the limits."""
        return max((getattr(point, key) / limit for key, limit in self.bounds().items()), default=0.0)

    def admits(self, point: Estimate) -> bool:
        return self.excess(point) <= 1.0


@dataclass(frozen=True, slots=True)
class Choice:
    throughput_optimal: Estimate | None
    latency_optimal: Estimate | None
    nearest_miss: Estimate | None  # only when nothing fits: the point closest to the limits


def latency_key(point: Estimate, mode: str) -> tuple[float, float]:
    """What "lowest latency" means: TTFT then ITL when streaming, end-to-end when sequential."""
    return (point.ttft_s, point.itl_s) if mode == "streaming" else (point.e2e_s, point.ttft_s)


def choose(points: list[Estimate], limits: Limits) -> Choice:
    inside = [p for p in points if limits.admits(p)]
    if not inside:
        return Choice(None, None, min(points, key=limits.excess) if points else None)
    best = max(inside, key=lambda p: (p.rps_per_device, -p.ttft_s))
    fastest = min(inside, key=lambda p: (*latency_key(p, limits.mode), -p.rps_per_device))
    return Choice(best, fastest, None)


def pareto_front(points: list[Estimate], latency: str) -> list[Estimate]:
    """Points no other point beats on both throughput per device and `latency` (an Estimate field), by latency."""
    front, best_rps = [], -math.inf
    for point in sorted(points, key=lambda p: (getattr(p, latency), -p.rps_per_device)):
        if point.rps_per_device > best_rps:
            front.append(point)
            best_rps = point.rps_per_device
    return front


@dataclass(frozen=True, slots=True)
class Fleet:
    replicas: int
    devices: int
    nodes: int


def fleet_for(point: Estimate, peak_rps: float, per_node: int) -> Fleet:
    replicas = max(1, math.ceil(peak_rps / point.rps - 1e-9))
    devices = replicas * point.tp
    return Fleet(replicas, devices, math.ceil(devices / max(per_node, 1)))
