"""The choice never leaves the limits, says "none fits" with the nearest miss, and sizes the fleet."""

import itertools

import pytest

from scripts.sizing.devices import load_device
from scripts.sizing.plan import build_plan
from scripts.sizing.roofline import MODELLED, Estimate, Roofline, Workload
from scripts.sizing.selection import Limits, choose, fleet_for, pareto_front
from scripts.sizing.shapes import load_shape


def sweep(limits: Limits, model: str = "llama-3-8b", device: str = "h100-sxm"):
    roofline = Roofline(load_shape(model), load_device(device), "bf16", "bf16")
    return build_plan(roofline, Workload.fixed(512, 256), limits, [1, 2, 4, 8])


LIMITS = [Limits(ttft, itl, e2e, mode) for ttft, itl, e2e, mode in itertools.product(
    (None, 0.005, 0.02, 0.1, 1.0), (None, 0.004, 0.01, 0.03), (None, 2.0, 10.0), ("streaming", "sequential"))]


@pytest.mark.parametrize("limits", LIMITS, ids=str)
def test_choice_is_always_inside_the_limits(limits: Limits) -> None:
    plan = sweep(limits)
    choice = plan.choice
    if choice.throughput_optimal is None:
        assert choice.latency_optimal is None
        assert choice.nearest_miss is not None and not limits.admits(choice.nearest_miss)
        assert not any(limits.admits(p) for p in plan.points)
        return
    for chosen in (choice.throughput_optimal, choice.latency_optimal):
        for key, bound in limits.bounds().items():
            assert getattr(chosen, key) <= bound
    inside = [p for p in plan.points if limits.admits(p)]
    assert choice.throughput_optimal.rps_per_device == max(p.rps_per_device for p in inside)
    key = "ttft_s" if limits.mode == "streaming" else "e2e_s"
    assert getattr(choice.latency_optimal, key) == min(getattr(p, key) for p in inside)


def test_sequential_mode_ignores_ttft_and_itl() -> None:
    limits = Limits(max_ttft_s=1e-9, max_itl_s=1e-9, max_e2e_s=30.0, mode="sequential")
    assert limits.bounds() == {"e2e_s": 30.0}
    assert sweep(limits).choice.throughput_optimal is not None


def test_none_fits_returns_the_nearest_miss() -> None:
    limits = Limits(max_ttft_s=1e-4, max_itl_s=1e-4)
    plan = sweep(limits)
    assert plan.choice.throughput_optimal is None and plan.choice.latency_optimal is None
    miss = plan.choice.nearest_miss
    assert miss is not None
    assert limits.excess(miss) == min(limits.excess(p) for p in plan.points) > 1.0


def test_memory_bound_configurations_are_excluded() -> None:
    plan = sweep(Limits(), model="llama-3-70b")
    assert plan.max_batch[1] == 0 and plan.memory_bound[1] == len([1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192,
                                                                   256, 384, 512, 768, 1024])
    for p in plan.points:
        assert p.concurrency <= plan.max_batch[p.tp]
    assert {p.tp for p in plan.points} == {2, 4, 8}


def test_choose_on_hand_made_points() -> None:
    def point(tp: int, c: int, ttft: float, itl: float, rps: float) -> Estimate:
        return Estimate(tp, c, ttft, itl, ttft + 99 * itl, rps, MODELLED)

    points = [point(1, 1, 0.1, 0.01, 1.0), point(1, 8, 0.3, 0.02, 6.0), point(2, 64, 2.0, 0.05, 30.0)]
    choice = choose(points, Limits(max_ttft_s=0.5, max_itl_s=0.03))
    assert (choice.throughput_optimal, choice.latency_optimal) == (points[1], points[0])
    assert pareto_front(points, "ttft_s") == points  # 30/2 = 15 req/s per device still beats 6
    assert pareto_front([*points, point(1, 2, 0.4, 0.02, 0.5)], "ttft_s") == points


def test_fleet_rounds_up_replicas_and_nodes() -> None:
    p = Estimate(2, 64, 0.1, 0.01, 2.0, 10.0, MODELLED)  # 10 req/s per replica of 2 GPUs
    fleet = fleet_for(p, peak_rps=65.0, per_node=8)
    assert (fleet.replicas, fleet.devices, fleet.nodes) == (7, 14, 2)
    assert fleet_for(p, peak_rps=10.0, per_node=8).replicas == 1
