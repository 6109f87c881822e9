"""bench/llm_serve.py --rounds: the servers' order alternates, and each figure is its median over the rounds."""

from __future__ import annotations

from bench.llm_serve import median_over_rounds, ratios, round_order


def aiperf_figures(tok_s: float, ttft_p50: float, itl_p50: float, errors: int = 0) -> dict[str, object]:
    return {"output_tok_s": tok_s, "ttft_ms": {"p50": ttft_p50, "p99": 2 * ttft_p50}, "itl_ms": {"p50": itl_p50},
            "error_request_count": errors, "export": f"/tmp/run-{tok_s}.json"}


def test_the_order_alternates_so_each_side_goes_first_as_often() -> None:
    servers = [("ours", 1), ("peer", 2)]
    orders = [[name for name, _ in round_order(servers, index)] for index in range(4)]
    assert orders == [["ours", "peer"], ["peer", "ours"], ["ours", "peer"], ["peer", "ours"]]


def test_each_figure_is_its_median_and_failures_add_up() -> None:
    rounds = [{"ours": {"c8": aiperf_figures(100.0, 900.0, 40.0)}, "peer": {"c8": aiperf_figures(80.0, 1000.0, 50.0)}},
              {"ours": {"c8": aiperf_figures(60.0, 1500.0, 70.0, errors=1)},
               "peer": {"c8": aiperf_figures(90.0, 800.0, 30.0)}},
              {"ours": {"c8": aiperf_figures(70.0, 1200.0, 60.0)}, "peer": {"c8": aiperf_figures(85.0, 950.0, 45.0)}}]
    combined = median_over_rounds(rounds)
    ours, peer = combined["ours"]["c8"], combined["peer"]["c8"]
    assert (ours["output_tok_s"], ours["ttft_ms"], ours["itl_ms"]) == (70.0, {"p50": 1200.0, "p99": 2400.0},
                                                                       {"p50": 60.0})
    assert (peer["output_tok_s"], peer["ttft_ms"]["p50"], peer["itl_ms"]["p50"]) == (85.0, 950.0, 45.0)
    assert ours["error_request_count"] == 1 and ours["rounds"] == 3
    assert "export" not in ours  # each round keeps its own export
    assert ratios(combined, "aiperf")["c8"] == {"output_tok_s": 70.0 / 85.0, "ttft_p50": 1200.0 / 950.0,
                                                "itl_p50": 60.0 / 45.0}


def test_a_round_cut_short_still_combines_what_it_has() -> None:
    rounds = [{"ours": {"c1": aiperf_figures(40.0, 100.0, 20.0)}, "peer": {"c1": aiperf_figures(30.0, 120.0, 25.0)}},
              {"peer": {"c1": aiperf_figures(50.0, 110.0, 22.0)}}]
    combined = median_over_rounds(rounds)
    assert combined["ours"]["c1"]["output_tok_s"] == 40.0 and combined["ours"]["c1"]["rounds"] == 1
    assert combined["peer"]["c1"]["output_tok_s"] == 40.0 and combined["peer"]["c1"]["rounds"] == 2


def test_one_round_is_kept_as_it_is() -> None:
    one = [{"ours": {"c1": aiperf_figures(40.0, 100.0, 20.0)}}]
    assert median_over_rounds(one) is one[0]  # export paths and all
