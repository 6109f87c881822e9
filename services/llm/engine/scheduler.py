"""In-flight batching: which sequences run this step, and how many of their tokens.

Each step first continues the running sequences (a decode token, or the next prefill chunk), then admits
waiting ones first-come-first-served while the token budget, `max_num_seqs` and free KV blocks allow.
When blocks run out, the newest running sequence is preempted: its blocks are freed and it is recomputed
later (its finished blocks usually survive in the prefix cache).

With speculative decoding on, a decode is scheduled with room for its draft tokens behind it (the runner
asks the proposer to fill it); what the target rejects is rolled back after the step.

While other sequences share the engine, one prefill chunk takes at most `long_prefill_token_threshold` tokens
of a step (vLLM's knob of that name): a long prompt then advances a slice per step while decodes keep their
steps short and waiting requests get admitted, instead of every step being that prompt's. All the step's
prefill chunks together take at most `max_prefill_tokens_per_step` when it is set (TGI's `max_batch_prefill_tokens`).
A burst of new prompts is then prefilled a few per step: the first of them stream their first token after a short
step instead of after one step that holds them all, but every stream already running pauses for each of those
steps, and there are more of them. By default there is no such cap (as in vLLM): under aiperf at concurrency 8
and 32 (200-token prompts, 64 outputs, SmolLM2-135M in bf16, a 2-core EPYC), a cap of 512 against none gave
5-10% less output throughput and ITL p50 25-35% higher, for TTFT p50 0.5-0.7x. A sequence alone in the engine
takes the whole `max_num_batched_tokens`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.llm.engine.block_manager import BlockManager
from services.llm.engine.sequence import Sequence, SequenceStatus
from services.llm.speculative import SpeculativeConfig, speculation_slots


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per sequence, starting at its num_computed_tokens

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        assert num_new_tokens > 0
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int = 0, speculative: SpeculativeConfig | None = None,
                 max_prefill_tokens_per_step: int = 0) -> None:
        assert long_prefill_token_threshold >= 0 and max_prefill_tokens_per_step >= 0
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold  # 0: no cap
        self.max_prefill_tokens_per_step = max_prefill_tokens_per_step  # 0: no cap
        self.speculative = speculative or SpeculativeConfig()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence, front: bool = False) -> None:
        assert seq.status is SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        prefill_room = self._step_prefill_cap()
        preempted, prefilled = self._schedule_running(batch, budget, prefill_room)
        budget -= sum(batch.num_new_tokens)
        # After a preemption there is no room to spare: admitting now would only preempt again.
        if not preempted:
            self._admit_waiting(batch, budget, prefill_room - prefilled)
        return batch

    def _schedule_running(self, batch: ScheduledBatch, budget: int, prefill_room: int) -> tuple[bool, int]:
        """Schedules the running sequences; returns whether one was preempted, and the prefill tokens taken."""
        manager = self.block_manager
        preempted = False
        prefilled = 0
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            wanted = seq.num_tokens - seq.num_computed_tokens
            is_decode = wanted == 1
            if is_decode:  # room behind its token for the drafts of speculative decoding
                wanted += min(speculation_slots(self.speculative, seq, len(self.running)),
                              self._draft_room(seq, len(self.running) - i - 1))
            elif prefilled >= prefill_room:  # this step's prefill tokens are spent: the chunk waits a step
                i += 1
                continue
            # A prefill chunk (or a decode's draft room) shrinks to the free blocks before anyone is preempted for it.
            num_new = min(wanted, budget, self._chunk_cap(), max(manager.room_for(seq), 1))
            if not is_decode:
                num_new = min(num_new, prefill_room - prefilled)
            while not manager.can_grow(seq, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                manager.grow(seq, num_new)
                batch.add(seq, num_new)
                budget -= num_new
                prefilled += 0 if is_decode else num_new
                i += 1
        return preempted, prefilled

    def _admit_waiting(self, batch: ScheduledBatch, budget: int, prefill_room: int) -> None:
        manager = self.block_manager
        while self.waiting and min(budget, prefill_room) > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = manager.prefix_match(seq)
            num_new = min(seq.num_tokens - len(cached) * manager.block_size, budget, prefill_room, self._chunk_cap(),
                          manager.room_after(cached))
            if num_new <= 0 or not manager.can_admit(cached, num_new):
                break
            self.waiting.popleft()
            manager.admit(seq, cached, num_new)
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += seq.num_computed_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
            prefill_room -= num_new

    def _draft_room(self, seq: Sequence, num_after: int) -> int:
        """Draft tokens a decode may reserve while a fresh block stays free for each running sequence after it:
        speculation takes only room nobody else needs, so it never causes a preemption on its own."""
        manager = self.block_manager
        spare_blocks = max(0, manager.num_free_blocks - num_after)
        return max(0, (len(seq.block_table) + spare_blocks) * manager.block_size - seq.num_computed_tokens - 1)

    def _chunk_cap(self) -> int:
        """Most tokens one sequence may take this step: a sequence alone in the engine may take the whole budget."""
        if self.long_prefill_token_threshold and self._shared():
            return self.long_prefill_token_threshold
        return self.max_num_batched_tokens

    def _step_prefill_cap(self) -> int:
        """Most prefill tokens of all sequences together this step (a sequence alone: the whole budget)."""
        if self.max_prefill_tokens_per_step and self._shared():
            return self.max_prefill_tokens_per_step
        return self.max_num_batched_tokens

    def _shared(self) -> bool:
        return len(self.running) + len(self.waiting) > 1

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Takes a finished sequence out of the running set and frees its blocks at once."""
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def remove(self, seq: Sequence) -> None:
        """Drops a sequence wherever it is (abort), freeing its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
