"""How scripts/ingest.py groups files into upload requests."""

from __future__ import annotations

from pathlib import Path

from scripts.ingest import FilePlan, upload_batches


def _plan(name: str, characters: int, size: int) -> FilePlan:
    return FilePlan(Path(f"/docs/{name}"), {name: "fp"}, characters=characters, bytes=size)


def test_longest_text_first_within_file_and_byte_limits() -> None:
    plans = [_plan("a", 10, 100), _plan("b", 500, 100), _plan("c", 300, 100), _plan("d", 40, 100),
             _plan("e", 200, 100)]
    batches = upload_batches(plans, max_files=2, max_bytes=10_000)
    assert [[p.path.name for p in batch] for batch in batches] == [["b", "c"], ["e", "d"], ["a"]]


def test_a_file_over_the_byte_limit_goes_alone_and_nothing_is_lost() -> None:
    plans = [_plan("small1", 5, 10), _plan("huge", 9_000, 5_000), _plan("small2", 4, 10), _plan("mid", 50, 600)]
    batches = upload_batches(plans, max_files=32, max_bytes=1_000)
    assert [[p.path.name for p in batch] for batch in batches] == [["huge"], ["mid", "small1", "small2"]]
    assert sum(len(b) for b in batches) == len(plans)
    assert all(sum(p.bytes for p in b) <= 1_000 or len(b) == 1 for b in batches)
