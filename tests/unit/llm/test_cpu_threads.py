"""The CPU thread team that follows the cores other processes leave free: its measurement and decisions on a
scripted clock, its /proc/stat reading, the core small steps leave to a front end, when an engine has one (and
with what setting), and an engine's tokens while its thread count changes between steps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from services.llm.engine import cpu_threads
from services.llm.engine.cpu_threads import SAMPLE_SECONDS, STALE_SECONDS, CpuThreads, busy_seconds
from services.llm.speculative import SpeculativeConfig
from tests.unit.llm.test_engine_greedy import greedy, random_prompts, run_staggered
from tests.unit.llm.test_speculative import repetitive_prompts


class Machine:
    """A scripted machine: `run(seconds, others, own)` advances the clock with `others` cores busy in other
    processes and `own` in this one."""

    def __init__(self) -> None:
        self.now, self.busy, self.own = 100.0, 0.0, 0.0
        self.reads = 0
        self.set_to: list[int] = []
        self.threads = torch.get_num_threads()

    def set_threads(self, threads: int) -> None:
        self.set_to.append(threads)
        self.threads = threads

    def read_busy(self) -> float:
        self.reads += 1
        return self.busy

    def run(self, seconds: float, others: float, own: float) -> None:
        self.now += seconds
        self.busy += (others + own) * seconds
        self.own += own * seconds

    def governor(self, cores: int, front_end_core_tokens: int = 0) -> CpuThreads:
        return CpuThreads(set(range(cores)), front_end_core_tokens, read_busy=self.read_busy,
                          own_seconds=lambda: self.own,
                          clock=lambda: self.now, set_threads=self.set_threads)


@pytest.fixture(autouse=True)
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_the_team_shrinks_while_another_process_is_busy_and_grows_back() -> None:
    torch.set_num_threads(2)
    machine = Machine()
    governor = machine.governor(2)
    machine.run(SAMPLE_SECONDS, others=0.7, own=1.3)  # a spinning neighbour gets its share of both cores
    governor.adjust()
    assert machine.set_to == [1] and governor.threads == 1
    machine.run(SAMPLE_SECONDS, others=1.0, own=1.0)
    governor.adjust()
    assert machine.set_to == [1]  # unchanged: no call
    machine.run(SAMPLE_SECONDS, others=0.05, own=1.0)  # the neighbour stopped
    governor.adjust()
    assert machine.set_to == [1, 2] and governor.threads == 2


def test_it_measures_at_most_once_a_sample_period() -> None:
    torch.set_num_threads(2)
    machine = Machine()
    governor = machine.governor(2)
    for _ in range(5):
        machine.run(SAMPLE_SECONDS / 10, others=1.0, own=1.0)
        governor.adjust()
    assert machine.reads == 1 and not machine.set_to  # only the construction's sample
    machine.run(SAMPLE_SECONDS * 0.6, others=1.0, own=1.0)
    governor.adjust()
    assert machine.reads == 2 and machine.set_to == [1]


def test_a_long_idle_gap_only_restarts_the_measurement() -> None:
    torch.set_num_threads(2)
    machine = Machine()
    governor = machine.governor(2)
    machine.run(STALE_SECONDS + 1, others=1.0, own=0.0)  # an idle engine: no steps, so no samples
    governor.adjust()
    assert not machine.set_to
    machine.run(SAMPLE_SECONDS, others=0.0, own=2.0)
    governor.adjust()
    assert not machine.set_to and governor.threads == 2


@pytest.mark.parametrize(("others", "threads"), [(0.0, 8), (0.4, 8), (1.4, 7), (2.6, 5), (7.9, 1), (30.0, 1)])
def test_threads_are_the_free_cores_rounded_and_at_least_one(others: float, threads: int) -> None:
    torch.set_num_threads(8)
    machine = Machine()
    governor = machine.governor(8)
    machine.run(SAMPLE_SECONDS, others=others, own=8 - min(others, 7))
    governor.adjust()
    assert governor.threads == threads
    assert machine.set_to == ([] if threads == 8 else [threads])


def test_small_steps_leave_a_core_to_the_front_end() -> None:
    torch.set_num_threads(4)
    machine = Machine()
    governor = machine.governor(4, front_end_core_tokens=4)
    for tokens, threads in [(1, 3), (4, 3), (5, 4), (300, 4), (2, 3)]:
        governor.before_step(tokens)
        assert machine.threads == threads
    assert machine.set_to == [3, 4, 3]  # no call where the count stays
    machine.run(SAMPLE_SECONDS, others=2.0, own=1.0)  # the team shrinks to 2 (from the next step on)
    governor.before_step(1)
    assert governor.threads == 2 and machine.threads == 1
    governor.before_step(64)
    assert machine.threads == 2


def test_a_one_thread_team_and_a_zero_setting_keep_the_team() -> None:
    torch.set_num_threads(2)
    machine = Machine()
    governor = machine.governor(2)  # front_end_core_tokens 0, an engine's default
    governor.before_step(1)
    assert not machine.set_to
    governor = machine.governor(2, front_end_core_tokens=4)
    machine.run(SAMPLE_SECONDS, others=1.0, own=1.0)
    governor.before_step(1)
    assert governor.threads == 1 and machine.set_to == [1]  # the team of one: never fewer


def test_busy_seconds_counts_the_given_cores_busy_columns(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    stat.write_text("cpu  900 0 900 900 0 0 0 0 0 0\n"
                    "cpu0 100 1 10 5000 7 2 3 40 6 0\n"  # user nice system idle iowait irq softirq steal guest ...
                    "cpu1 200 0 20 5000 0 0 0 0 0 0\n"
                    "cpu2 400 0 40 5000 0 0 0 0 0 0\n"
                    "intr 12345\nctxt 999\n")
    ticks = os.sysconf("SC_CLK_TCK")
    assert busy_seconds({0, 2}, stat) == pytest.approx((100 + 1 + 10 + 2 + 3 + 40 + 400 + 40) / ticks)
    assert busy_seconds(cpu_threads.usable_cores()) > 0  # this machine's


def test_no_governor_where_the_thread_count_is_fixed_or_there_is_one_core(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert CpuThreads.for_this_process() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: {3})
    assert CpuThreads.for_this_process() is None
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: {0, 1})
    governor = CpuThreads.for_this_process()
    assert governor is not None and governor.max_threads == 2


def test_an_engine_has_one_unless_turned_off(tiny_models, make_engine, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: {0, 1})
    governor = make_engine(tiny_models["llama"], max_model_len=64, kv_cache_gib=0.01).runner.cpu_threads
    assert governor is not None and governor.front_end_core_tokens == 0  # nothing else serves in this process
    governor = make_engine(tiny_models["llama"], max_model_len=64, kv_cache_gib=0.01,
                           cpu_front_end_core_tokens=4).runner.cpu_threads
    assert governor is not None and governor.front_end_core_tokens == 4
    assert make_engine(tiny_models["llama"], max_model_len=64, kv_cache_gib=0.01,
                       cpu_adaptive_threads=False).runner.cpu_threads is None


@pytest.mark.parametrize(("environment", "tokens"), [({}, 4), ({"LLM_CPU_FRONT_END_CORE_TOKENS": "2"}, 2)])
def test_the_server_leaves_its_front_end_a_core(environment: dict[str, str], tokens: int, tiny_models,
                                                monkeypatch) -> None:
    from services.llm.app import load_engine
    from services.llm.settings import LLMSettings

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: {0, 1})
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = LLMSettings(device="cpu", dtype="float32", max_model_len=64, kv_cache_gib=0.01)
    engine = load_engine(settings, str(tiny_models["llama"]), {})
    assert engine.runner.cpu_threads.front_end_core_tokens == tokens


class Recording:
    """Stands in for the governor: the tokens of each step it is told of."""

    def __init__(self) -> None:
        self.tokens: list[int] = []

    def before_step(self, tokens: int) -> None:
        self.tokens.append(tokens)


def test_the_governor_hears_of_the_tokens_a_step_runs_not_the_room_for_drafts(tiny_models, make_engine) -> None:
    """With speculation, the scheduler reserves room for drafts behind each decode, and the proposer fills some of
    it or none; the governor is told the tokens the model then runs (a 1-token decode without drafts is a small
    step, whatever room was reserved)."""
    engine = make_engine(tiny_models["llama"], cpu_adaptive_threads=False,
                         speculative=SpeculativeConfig(method="ngram", num_tokens=4, ngram_min=1, ngram_max=3))
    engine.runner.cpu_threads = governor = Recording()
    scheduled, ran = [], []
    execute = engine.runner.execute

    def recording_execute(batch):
        scheduled.append(sum(batch.num_new_tokens))
        return execute(batch)

    engine.runner.execute = recording_execute
    engine.runner.model.register_forward_pre_hook(lambda module, args: ran.append(len(args[0])))
    run_staggered(engine, random_prompts(2, 3, 40, seed=5) + repetitive_prompts(2, seed=5), greedy(24))
    assert governor.tokens == ran
    assert any(room > tokens for room, tokens in zip(scheduled, ran, strict=True))  # room left unfilled


class Flipping:
    """Stands in for the governor: a different thread count every step."""

    def __init__(self) -> None:
        self.steps = 0

    def before_step(self, tokens: int) -> None:
        self.steps += 1
        torch.set_num_threads(1 + self.steps % 2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tokens_do_not_depend_on_the_thread_count_changing_between_steps(dtype: str, tiny_models,
                                                                         make_engine) -> None:
    prompts = random_prompts(6, 3, 150, seed=11)  # prefills past cpu_compiled's 128 rows too
    tokens = {}
    for name in ("fixed", "flipping"):
        torch.set_num_threads(2)
        engine = make_engine(tiny_models["qwen2"], dtype=dtype, cpu_adaptive_threads=False)
        if name == "flipping":
            engine.runner.cpu_threads = Flipping()
        finals = run_staggered(engine, prompts, greedy())
        tokens[name] = [finals[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))]
        if name == "flipping":
            assert engine.runner.cpu_threads.steps > 10
    assert tokens["flipping"] == tokens["fixed"]
