"""The analytic model: TTFT, ITL and throughput of one replica (TP devices) at a given concurrency.

- Prefill is compute-bound: 2 × matmul params × tokens + causal attention FLOPs, over TP × peak FLOPs × the
  compute efficiency (it cannot beat reading the weights once, either).
- A decode step is bandwidth-bound: every step reads this device's share of the weights and of every running
  request's KV cache, over peak bandwidth × the bandwidth efficiency (or FLOPs-bound at very large batches).
- TP splits weights and KV heads over the devices (KV heads are replicated when TP exceeds them) and pays two
  all-reduces of the activations per layer (after attention and after the MLP) over the node's link.
- Serving at concurrency b is a closed loop (each of b users sends the next request when the last one ends):
  per output token a request waits one decode step plus its share of the other b-1 requests' prefills, a new
  request waits for the prefills ahead of it (M/D/1), and Little's law gives requests/s = b / end-to-end latency.
The efficiencies and a fixed per-step overhead are the three free parameters `calibrate` fits to measured points.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import optimize

from .devices import Device
from .measured import MeasuredPoint
from .shapes import ModelShape

MEASURED, MODELLED, CALIBRATED = "measured", "modelled", "modelled, calibrated"


@dataclass(frozen=True, slots=True)
class Workload:
    input_tokens: np.ndarray
    output_tokens: np.ndarray

    @classmethod
    def fixed(cls, input_tokens: float, output_tokens: float) -> Workload:
        return cls(np.array([float(input_tokens)]), np.array([float(output_tokens)]))

    @classmethod
    def from_file(cls, path: Path) -> Workload:
        """Lines of `input output` token counts (comma, tab or space separated; a header line is skipped)."""
        pairs = []
        for line in path.read_text().splitlines():
            fields = line.replace(",", " ").split()
            if len(fields) < 2:
                continue
            try:
                pairs.append((float(fields[0]), float(fields[1])))
            except ValueError:
                continue  # a header
        if not pairs:
            raise ValueError(f"{path}: no `input output` token-count lines")
        data = np.array(pairs)
        if (data <= 0).any():
            raise ValueError(f"{path}: token counts must be positive")
        return cls(data[:, 0], data[:, 1])

    @property
    def mean_input(self) -> float:
        return float(self.input_tokens.mean())

    @property
    def mean_output(self) -> float:
        return float(self.output_tokens.mean())

    @property
    def kv_tokens(self) -> float:
        """Tokens a request holds in the KV cache when it finishes (prompt + answer), on average."""
        return float((self.input_tokens + self.output_tokens).mean())


@dataclass(frozen=True, slots=True)
class Efficiency:
    compute: float = 0.5  # fraction of peak FLOPs prefill reaches
    bandwidth: float = 0.75  # fraction of peak memory bandwidth decode reaches
    step_overhead_s: float = 5e-4  # scheduler, launches, sampling: fixed cost of every engine step


@dataclass(frozen=True, slots=True)
class Estimate:
    tp: int
    concurrency: int
    ttft_s: float
    itl_s: float
    e2e_s: float
    rps: float  # requests/s of one replica (tp devices)
    label: str

    @property
    def rps_per_device(self) -> float:
        return self.rps / self.tp


@dataclass(frozen=True, slots=True)
class Fit:
    efficiency: Efficiency
    points: int
    error: dict[str, float]  # mean |modelled / measured - 1| per metric, after the fit
    nominal_error: dict[str, float]  # the same with the default efficiencies


class Roofline:
    def __init__(self, shape: ModelShape, device: Device, precision: str, kv_precision: str,
                 memory_utilization: float = 0.9) -> None:
        self.shape, self.device = shape, device
        self.precision, self.kv_precision = precision, kv_precision
        self.flops = device.tflops[device.compute_precision(precision)] * 1e12
        self.activation_bytes = 4.0 if precision == "fp32" else 2.0
        self.memory_utilization = memory_utilization

    # --- memory -------------------------------------------------------------------------------------------
    def weights_per_device(self, tp: int) -> float:
        return self.shape.weight_bytes(self.precision) / tp

    def kv_per_token_per_device(self, tp: int) -> float:
        heads_here = math.ceil(self.shape.kv_heads / tp)  # replicated when tp > kv heads
        return self.shape.kv_bytes_per_token(self.kv_precision) * heads_here / self.shape.kv_heads

    def kv_per_request(self, workload: Workload) -> float:
        return self.shape.kv_bytes_per_token(self.kv_precision) * workload.kv_tokens

    def max_batch(self, tp: int, workload: Workload) -> int:
        """Requests whose KV fits beside the weights on every device (0: the weights alone do not fit)."""
        budget = self.device.kv_budget_bytes(self.weights_per_device(tp), self.memory_utilization)
        if budget <= 0 or self.weights_per_device(tp) > self.device.memory_gb * 1e9:
            return 0
        return int(budget // (self.kv_per_token_per_device(tp) * workload.kv_tokens))

    def valid_tp(self, tp: int) -> bool:
        return tp <= max(self.device.per_node, 1) and self.shape.heads % tp == 0

    # --- time ---------------------------------------------------------------------------------------------
    def allreduce_s(self, tp: int, tokens: float | np.ndarray) -> float | np.ndarray:
        """Two ring all-reduces per layer of the activations of `tokens` tokens."""
        if tp == 1:
            return 0.0 * tokens
        size = tokens * self.shape.hidden * self.activation_bytes
        link = self.device.link_gbs * 1e9
        one = 2 * (tp - 1) / tp * size / link + self.device.link_latency_us * 1e-6
        return 2 * self.shape.layers * one

    def prefill_s(self, tp: int, input_tokens: np.ndarray, eff: Efficiency) -> np.ndarray:
        s = self.shape
        flops = 2 * s.matmul_params * input_tokens + 2 * s.layers * s.heads * s.head_dim * input_tokens ** 2
        compute = flops / (tp * self.flops * eff.compute)
        weights = self.weights_per_device(tp) / (self.device.bandwidth_gbs * 1e9 * eff.bandwidth)
        return np.maximum(compute, weights) + self.allreduce_s(tp, input_tokens) + eff.step_overhead_s

    def decode_step_s(self, tp: int, batch: int, context: float, eff: Efficiency) -> float:
        s = self.shape
        read = self.weights_per_device(tp) + batch * context * self.kv_per_token_per_device(tp)
        memory = read / (self.device.bandwidth_gbs * 1e9 * eff.bandwidth)
        flops = batch * (2 * s.matmul_params + 4 * s.layers * s.heads * s.head_dim * context)
        compute = flops / (tp * self.flops * eff.compute)
        return max(memory, compute) + float(self.allreduce_s(tp, batch)) + eff.step_overhead_s

    def serve(self, tp: int, concurrency: int, workload: Workload, eff: Efficiency, label: str = MODELLED
              ) -> Estimate:
        b, out = concurrency, max(workload.mean_output, 1.0)
        prefill = float(self.prefill_s(tp, workload.input_tokens, eff).mean())
        step = self.decode_step_s(tp, b, workload.mean_input + out / 2, eff)
        cycle = b * prefill + out * step  # one request's lifetime: b prefills and `out` decode steps
        itl = step + (b - 1) * prefill / out
        others = (b - 1) * prefill / cycle  # share of time spent on the other requests' prefills
        ttft = prefill + (step / 2 if b > 1 else 0.0) + others * prefill / (2 * (1 - others))
        e2e = ttft + (out - 1) * itl
        return Estimate(tp, b, ttft, itl, e2e, b / e2e, label)

    # --- calibration --------------------------------------------------------------------------------------
    def _errors(self, points: list[MeasuredPoint], eff: Efficiency) -> np.ndarray:
        rows = []
        for p in points:
            est = self.serve(p.tp, p.concurrency, Workload.fixed(p.input_tokens, p.output_tokens), eff)
            rows.append([est.ttft_s / p.ttft_s, est.itl_s / p.itl_s, est.rps / p.rps])
        return np.array(rows)

    def calibrate(self, points: list[MeasuredPoint]) -> Fit:
        """Fit compute and bandwidth efficiency and step overhead: least squares on log(modelled / measured)."""
        assert points, "calibration needs measured points"

        def loss(eff: Efficiency) -> float:
            return float((np.log(self._errors(points, eff)) ** 2).sum())

        def from_logs(x: np.ndarray) -> Efficiency:
            return Efficiency(*np.exp(x).tolist())

        grid = itertools.product(np.geomspace(1e-3, 2.0, 10), np.geomspace(1e-3, 2.0, 10), np.geomspace(1e-6, 1, 10))
        start = min((Efficiency(*values) for values in grid), key=loss)  # a coarse grid, then Nelder-Mead from there
        found = optimize.minimize(lambda x: loss(from_logs(x)), np.log([start.compute, start.bandwidth,
                                  start.step_overhead_s]), method="Nelder-Mead",
                                  options={"xatol": 1e-4, "fatol": 1e-12, "maxiter": 3000})
        best = from_logs(found.x) if found.fun <= loss(start) else start

        def summary(eff: Efficiency) -> dict[str, float]:
            errors = np.abs(self._errors(points, eff) - 1).mean(axis=0)
            return dict(zip(("ttft", "itl", "rps"), map(float, errors), strict=True))

        return Fit(best, len(points), summary(best), summary(Efficiency()))


def measured_estimate(point: MeasuredPoint) -> Estimate:
    return Estimate(point.tp, point.concurrency, point.ttft_s, point.itl_s, point.e2e_s, point.rps, MEASURED)


def matches_workload(point: MeasuredPoint, workload: Workload, tolerance: float = 0.25) -> bool:
    """A measured point stands for this workload when its mean lengths are within `tolerance` of it."""
    return (abs(point.input_tokens / workload.mean_input - 1) <= tolerance
            and abs(point.output_tokens / workload.mean_output - 1) <= tolerance)

