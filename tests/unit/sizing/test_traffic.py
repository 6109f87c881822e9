"""Poisson peaks and the day/user/token conversions of the GTC sizing talk."""

import numpy as np
import pytest
from scipy.stats import poisson

from scripts.sizing import traffic

MEANS = [*np.linspace(0.05, 60.0, 120), *np.geomspace(60.0, 2e5, 40)]
PERCENTILES = [0.5, 0.8, 0.9, 0.95, 0.99, 0.999]


@pytest.mark.parametrize("percentile", PERCENTILES)
def test_poisson_ppf_matches_scipy_over_a_grid(percentile: float) -> None:
    ours = [traffic.poisson_ppf(percentile, mean) for mean in MEANS]
    assert ours == [int(poisson.ppf(percentile, mean)) for mean in MEANS]


def test_poisson_cdf_matches_scipy() -> None:
    for mean in (0.3, 7.0, 53.2, 1000.0, 54321.0):
        for k in {0, int(mean // 2), int(mean), int(mean * 1.2) + 3}:
            assert traffic.poisson_cdf(k, mean) == pytest.approx(poisson.cdf(k, mean), rel=1e-9, abs=1e-15)


def test_issue_example_mean_seven_peaks_at_twelve() -> None:
    assert traffic.peak_rate(7.0) == 12  # 71% above the mean
    assert traffic.peak_rate(7.0, window_s=2.0) == traffic.poisson_ppf(0.95, 14.0) / 2


def test_talk_worked_example_peak_to_average_to_requests_per_day() -> None:
    """65.6 peak prompts/s per DGX H100 (Llama-7B, 128 in / 512 out) -> 53.2 req/s average -> ~1.5M per 8 h."""
    average = traffic.average_for_peak(65.6, percentile=0.95)
    assert average == pytest.approx(53.2, abs=0.05)
    assert traffic.peak_rate(average) <= 65.6 < traffic.peak_rate(average + 0.1)
    per_day = traffic.requests_per_day(average, hours=8)
    assert per_day == pytest.approx(1.53e6, rel=0.01)
    assert round(per_day / 1e6, 1) == 1.5
    assert traffic.users_per_day(average, requests_per_user=10, hours=8) == pytest.approx(per_day / 10)
    tokens_in, tokens_out = traffic.tokens_per_day(average, 8, 128, 512)
    assert (tokens_in, tokens_out) == pytest.approx((per_day * 128, per_day * 512))


def test_users_to_rate_and_back() -> None:
    rate = traffic.average_rate(users_per_day=153_000, requests_per_user=10, hours=8)
    assert rate == pytest.approx(1_530_000 / 28_800)
    assert traffic.users_per_day(rate, 10, 8) == pytest.approx(153_000)


def test_average_for_peak_inverts_peak_rate() -> None:
    for capacity in (1.0, 5.0, 12.0, 65.6, 400.0):
        average = traffic.average_for_peak(capacity)
        assert traffic.peak_rate(average) <= capacity
        assert traffic.peak_rate(average * 1.01 + 0.01) > np.floor(capacity) - 1e-9


def test_percentile_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError):
        traffic.poisson_ppf(1.0, 3.0)
