"""torch's CPU thread team sized to the cores other processes leave free.

The engine's OpenMP team meets at a barrier in every parallel region (each linear layer, each attention call), so
one of its threads descheduled by another process stalls all of them: on a 2-core EPYC with one other process
spinning (a load generator polling, a second service), a decode step of one sequence took 20 ms on two threads and
11.7 ms on one, and a closed loop of 8 and 32 requests gave 24-26% and 9% less output on two threads than on one.
With both cores free, two threads gave 40-65% more. So the team follows what is free: about once a second, between
steps, `CpuThreads` reads how busy this process's cores were (`/proc/stat`), takes away this process's own CPU time,
and sets torch's thread count to the cores left, rounded, at least one. Only cores in the process's affinity are
counted; a VM's steal time (its host running something else on the core) counts as busy too, since it stalls a
team thread the same way. Outputs do not depend on the thread count (the engine's CPU kernels, oneDNN's linears
and SDPA split their work without changing any sum; `tests/unit/llm/test_cpu_threads.py` checks an engine's tokens
while its thread count changes between steps).

Where a server's front end (parsing, detokenizing, streaming) runs in this process beside the engine, the smallest
steps also leave it a core: a step of up to `front_end_core_tokens` tokens runs on one thread fewer than the
team. With the team on every core, each burst of the front end's work preempts a team thread, and the team waits
at its next barrier. On the 2-core EPYC, served alone under paced aiperf (200 tokens in, 64 out), one thread for
steps of up to 4 tokens took the ITL p50 at concurrency 1 from 16.1-16.3 ms to 12.1-12.5 (output 57 -> 73-75
tok/s), and at concurrency 4 from 19.4-20.2 ms to 16.6-16.7, though in-process, with no front end, a 1-token step is
faster on two threads (10.3 ms) than on one (11.4): at that size the step streams the weights, and the second
thread adds little read rate. Bigger steps gain more from the whole team: up to 8 tokens made no clear
difference at concurrency 8 (ITL 22.3-22.4 ms against 21.1-25.2), and up to 16 lost at concurrency 16 (38 ms
against 30-34). vLLM's CPU backend keeps one core for its front end and scheduler at every step size.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from services.llm.kernels.hardware import usable_cores

log = logging.getLogger(__name__)

SAMPLE_SECONDS = 1.0  # how often the share is measured
STALE_SECONDS = 5.0  # a longer gap (an idle engine) only restarts the measurement
# /proc/stat columns after the cpu name: user nice system idle iowait irq softirq steal (guest time is in user).
_BUSY_COLUMNS = (0, 1, 2, 5, 6, 7)


def busy_seconds(cores: set[int], stat: Path = Path("/proc/stat")) -> float:
    """CPU seconds the given cores have spent busy since boot, by every process."""
    ticks = 0
    for line in stat.read_text().splitlines():
        name, _, rest = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
            values = rest.split()
            ticks += sum(int(values[i]) for i in _BUSY_COLUMNS if i < len(values))
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuThreads:
    """Call `before_step(tokens)` before each step: the team changes at most once per `SAMPLE_SECONDS`, and a
    step of up to `front_end_core_tokens` tokens runs on one thread fewer (0: none do)."""

    def __init__(self, cores: set[int], front_end_core_tokens: int = 0, read_busy: Callable[[], float] | None = None,
                 own_seconds: Callable[[], float] = time.process_time, clock: Callable[[], float] = time.monotonic,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        self.max_threads = len(cores)
        self.threads = min(torch.get_num_threads(), self.max_threads)  # the team
        self.front_end_core_tokens = front_end_core_tokens
        self._applied = self.threads  # what torch runs on now: the team, or one fewer for a small step
        self._read_busy = read_busy or (lambda: busy_seconds(cores))
        self._own_seconds, self._clock, self._set_threads = own_seconds, clock, set_threads
        self._last = self._sample()

    @classmethod
    def for_this_process(cls, front_end_core_tokens: int = 0) -> CpuThreads | None:
        """The governor for an engine on this process's cores, or None where there is nothing to adapt: one core,
        a thread count set by OMP_NUM_THREADS, or no /proc/stat."""
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        cores = usable_cores()
        if len(cores) < 2:
            return None
        try:
            busy_seconds(cores)
        except (OSError, ValueError):
            return None
        return cls(cores, front_end_core_tokens)

    def adjust(self) -> None:
        now = self._clock()
        if now - self._last[0] < SAMPLE_SECONDS:
            return
        last, self._last = self._last, self._sample()
        wall = self._last[0] - last[0]
        if wall > STALE_SECONDS:
            return
        others = max(0.0, (self._last[1] - last[1]) - (self._last[2] - last[2])) / wall
        threads = max(1, min(self.max_threads, int(self.max_threads - others + 0.5)))
        if threads != self.threads:
            log.info("CPU threads %d -> %d: other processes kept %.1f of this engine's %d cores busy",
                     self.threads, threads, others, self.max_threads)
            self._apply(threads)
            self.threads = threads

    def before_step(self, tokens: int) -> None:
        self.adjust()
        self._apply(self.threads - 1 if self.threads > 1 and tokens <= self.front_end_core_tokens else self.threads)

    def _apply(self, threads: int) -> None:
        if threads != self._applied:
            self._set_threads(threads)
            self._applied = threads

    def _sample(self) -> tuple[float, float, float]:
        return self._clock(), self._read_busy(), self._own_seconds()
