"""Two minutes of bench/soak.py: the four services under a mixed Poisson load while embed, rerank and the llm are
killed -9 and restarted in turn and one is paused; nothing unexplained, no KV block leaked, nothing lost.
About 5-7 minutes on a 2-core machine: start-up, 120 s of load (longer while the llm restarts: the load
goes on until every restarted service has served it 15 s), drain, the integrity check."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import MIX, SoakSettings, run_soak

SETTINGS = SoakSettings(duration=120, rate=1.0, fault_interval=20, first_fault_at=10, quiet_tail=0.25,
                        pause_seconds=6, settle=15, seed=0)


@pytest.mark.slow
def test_two_minutes_under_faults_lose_nothing(tmp_path: Path) -> None:
    report = run_soak(SETTINGS, tmp_path)

    assert report["unexplained_errors"] == 0, report["unexplained"]
    assert report["kv_cache_after_drain"]["idle"], report["kv_cache_after_drain"]
    assert report["kv_cache_after_drain"]["leaked_blocks"] == 0, report["kv_cache_after_drain"]
    assert report["integrity"]["lost_or_wrong"] == 0, report["integrity"]["problems"]
    assert report["integrity"]["states"].get("present", 0) > 0
    # The faults all happened, and the load (the same arrivals every run for a seed) covered the whole mix.
    assert sorted(f["service"] for f in report["faults"] if f["fault"] == "kill -9 + restart") == \
        ["embed", "llm", "rerank"]
    assert [f["fault"] for f in report["faults"]].count("SIGSTOP, SIGCONT") == 1
    assert not [f for f in report["faults"] if "failed_restarts" in f], report["faults"]
    assert set(report["load"]["sent"]) == set(MIX), report["load"]
    assert report["load"]["still_open_after_drain"] == 0
