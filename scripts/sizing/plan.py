"""One sizing run: measured and modelled points for every TP and concurrency, the choice, and the demand."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import traffic
from .devices import Device
from .measured import MeasuredPoint
from .roofline import (
    CALIBRATED,
    MODELLED,
    Efficiency,
    Estimate,
    Fit,
    Roofline,
    Workload,
    matches_workload,
    measured_estimate,
)
from .selection import Choice, Limits, choose
from .shapes import ModelShape

CONCURRENCIES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


@dataclass(frozen=True, slots=True)
class Demand:
    average_rps: float
    peak_rps: float
    percentile: float
    window_s: float
    hours: float
    requests_per_user: float | None = None

    @classmethod
    def from_average(cls, average: float, percentile: float, window_s: float, hours: float,
                     requests_per_user: float | None = None) -> Demand:
        peak = traffic.peak_rate(average, percentile, window_s)
        return cls(average, peak, percentile, window_s, hours, requests_per_user)

    @classmethod
    def from_peak(cls, peak: float, percentile: float, window_s: float, hours: float,
                  requests_per_user: float | None = None) -> Demand:
        average = traffic.average_for_peak(peak, percentile, window_s)
        return cls(average, peak, percentile, window_s, hours, requests_per_user)


@dataclass(slots=True)
class Plan:
    roofline: Roofline
    workload: Workload
    limits: Limits
    points: list[Estimate]  # every configuration that fits in memory
    max_batch: dict[int, int]  # per TP
    memory_bound: dict[int, int]  # per TP: concurrencies dropped because their KV does not fit
    fit: Fit | None
    measured: list[MeasuredPoint]  # the points used (calibration, and candidates when the workload matches)
    skipped: list[str] = field(default_factory=list)
    choice: Choice | None = None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _mismatch(point: MeasuredPoint, shape: ModelShape, device: Device) -> str | None:
    """Why a measured point is not of this model on this device, or None when it is (as far as it says)."""
    if point.model and _slug(shape.name) not in _slug(point.model):
        return f"model {point.model!r} is not {shape.name}"
    name = point.device.lower()
    if device.kind == "cpu":
        if "nvidia" in name or "gpu" in name:
            return f"device {point.device!r} is not a CPU"
    elif name and _slug(device.name.split("-")[0]) not in _slug(name):
        return f"device {point.device!r} is not {device.name}"
    return None


def build_plan(roofline: Roofline, workload: Workload, limits: Limits, tps: list[int],
               concurrencies: list[int] | tuple[int, ...] = CONCURRENCIES,
               measured: list[MeasuredPoint] | None = None, efficiency: Efficiency | None = None) -> Plan:
    used, skipped = [], []
    for point in measured or []:
        reason = _mismatch(point, roofline.shape, roofline.device)
        (skipped.append(f"{point.source}: {reason}") if reason else used.append(point))
    fit = roofline.calibrate(used) if used and efficiency is None else None
    eff = fit.efficiency if fit else (efficiency or Efficiency())
    label = CALIBRATED if fit else MODELLED

    points: dict[tuple[int, int], Estimate] = {}
    max_batch, memory_bound = {}, {}
    for tp in tps:
        if not roofline.valid_tp(tp):
            skipped.append(f"TP {tp}: not possible on {roofline.device.name} for {roofline.shape.name} "
                           f"({roofline.device.per_node} per node, {roofline.shape.heads} heads)")
            continue
        max_batch[tp] = roofline.max_batch(tp, workload)
        memory_bound[tp] = sum(c > max_batch[tp] for c in concurrencies)
        for c in concurrencies:
            if c <= max_batch[tp]:
                points[tp, c] = roofline.serve(tp, c, workload, eff, label)
    for point in used:  # a measurement of this very workload replaces the model at its configuration
        if matches_workload(point, workload):
            points[point.tp, point.concurrency] = measured_estimate(point)
    plan = Plan(roofline, workload, limits, sorted(points.values(), key=lambda p: (p.tp, p.concurrency)),
                max_batch, memory_bound, fit, used, skipped)
    plan.choice = choose(plan.points, limits)
    return plan
