"""Traffic arithmetic: Poisson peaks, and requests, users and tokens per day.

Requests arriving independently at an average rate λ per second are Poisson: in a one-second window the count
exceeds the distribution's 95th percentile only 5% of the time. Sizing for that percentile rather than the mean
is the GTC "LLM Inference Sizing" method (the 95th percentile of a Poisson with mean 7 is 12, 71% above it).
"""

from __future__ import annotations

import math

import numpy as np

_lgamma = np.frompyfunc(math.lgamma, 1, 1)


def _pmf_window(mean: float) -> tuple[int, np.ndarray]:
    """(first k, pmf of k..) over every k that carries probability above ~1e-40."""
    spread = 14.0 * math.sqrt(mean) + 30.0
    low = max(0, math.floor(mean - spread))
    ks = np.arange(low, math.ceil(mean + spread) + 1, dtype=np.float64)
    log_pmf = ks * math.log(mean) - mean - _lgamma(ks + 1).astype(np.float64)
    return low, np.exp(log_pmf)


def poisson_cdf(k: int, mean: float) -> float:
    if k < 0:
        return 0.0
    if mean <= 0:
        return 1.0
    low, pmf = _pmf_window(mean)
    if k < low:
        return 0.0
    return float(min(1.0, pmf[: k - low + 1].sum()))


def poisson_ppf(q: float, mean: float) -> int:
    """Smallest k with P(X <= k) >= q for X ~ Poisson(mean)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"percentile must be in (0, 1), got {q}")
    if mean <= 0:
        return 0
    low, pmf = _pmf_window(mean)
    cdf = np.cumsum(pmf)
    return low + int(np.searchsorted(cdf, q * (1 - 1e-12), side="left"))


def peak_rate(average: float, percentile: float = 0.95, window_s: float = 1.0) -> float:
    """Requests/s to provision for: the `percentile` of arrivals in a `window_s` window, per second."""
    return poisson_ppf(percentile, average * window_s) / window_s


def average_for_peak(capacity: float, percentile: float = 0.95, window_s: float = 1.0) -> float:
    """The largest average rate whose Poisson peak a system with `capacity` requests/s still absorbs."""
    arrivals = math.floor(capacity * window_s + 1e-9)  # whole requests in a window
    low, high = 0.0, arrivals + 10.0 * math.sqrt(arrivals + 1) + 10.0
    for _ in range(100):  # P(X <= arrivals) falls as the mean grows: bisect where it crosses the percentile
        mid = (low + high) / 2
        low, high = (mid, high) if poisson_cdf(arrivals, mid) >= percentile else (low, mid)
    return low / window_s


def average_rate(users_per_day: float, requests_per_user: float, hours: float) -> float:
    """Average requests/s when every user sends `requests_per_user` within `hours` working hours."""
    return users_per_day * requests_per_user / (hours * 3600.0)


def requests_per_day(rate: float, hours: float) -> float:
    return rate * hours * 3600.0


def users_per_day(rate: float, requests_per_user: float, hours: float) -> float:
    return requests_per_day(rate, hours) / requests_per_user


def tokens_per_day(rate: float, hours: float, input_tokens: float, output_tokens: float) -> tuple[float, float]:
    """(input tokens, output tokens) per day at an average `rate`."""
    daily = requests_per_day(rate, hours)
    return daily * input_tokens, daily * output_tokens
