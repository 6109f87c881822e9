"""The scheduler on its own, over a real block pool: steps are simulated by marking the scheduled tokens computed
and appending a token to every sequence whose prompt is done, as the engine would after sampling."""

from __future__ import annotations

from services.llm.engine.block_manager import BlockManager
from services.llm.engine.scheduler import ScheduledBatch, Scheduler
from services.llm.engine.sequence import Sequence

from .test_block_manager import sequence


def run_step(scheduler: Scheduler) -> dict[int, int]:
    """One engine step without a model: {seq_id: tokens scheduled}."""
    batch: ScheduledBatch = scheduler.schedule()
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True):
        seq.num_computed_tokens += num_new
        scheduler.block_manager.commit_computed_blocks(seq)
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)  # the sampled token: the next step decodes it
    return {seq.seq_id: n for seq, n in zip(batch.seqs, batch.num_new_tokens, strict=True)}


def decoding(scheduler: Scheduler, seq_id: int) -> Sequence:
    seq = sequence([1, 2, 3, 4], seq_id)
    scheduler.add(seq)
    run_step(scheduler)
    return seq


def test_a_long_prefill_is_capped_so_decodes_and_new_requests_keep_flowing() -> None:
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False), max_num_seqs=8,
                          max_num_batched_tokens=64, long_prefill_token_threshold=16)
    early = decoding(scheduler, 0)
    scheduler.add(sequence(list(range(10, 210)), 1))  # a 200-token prompt
    first = run_step(scheduler)
    assert first == {0: 1, 1: 16}
    scheduler.add(sequence([5, 6, 7, 8, 9, 10, 11, 12], 2))  # arrives while the long prompt is in mid-prefill
    steps = [run_step(scheduler) for _ in range(5)]
    # The newcomer is admitted at once and then decodes every step; the early request never misses a step.
    assert steps[0] == {0: 1, 1: 16, 2: 8}
    assert all(step[0] == 1 and step[2] == 1 and step[1] == 16 for step in steps[1:])
    assert early.num_output_tokens == 7


def test_without_the_cap_a_long_prefill_takes_the_whole_budget() -> None:
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False), max_num_seqs=8,
                          max_num_batched_tokens=64, long_prefill_token_threshold=0)
    decoding(scheduler, 0)
    scheduler.add(sequence(list(range(10, 210)), 1))
    run_step(scheduler)
    scheduler.add(sequence([5, 6, 7, 8], 2))
    assert run_step(scheduler) == {0: 1, 1: 63}  # the newcomer waits for the whole prompt


def test_a_burst_of_prompts_is_prefilled_a_few_per_step_while_decodes_run_every_step() -> None:
    scheduler = Scheduler(BlockManager(num_blocks=128, block_size=4, enable_prefix_caching=False), max_num_seqs=8,
                          max_num_batched_tokens=64, long_prefill_token_threshold=16, max_prefill_tokens_per_step=20)
    decoding(scheduler, 0)
    for seq_id in (1, 2, 3):  # three 12-token prompts arrive together
        scheduler.add(sequence(list(range(10 * seq_id, 10 * seq_id + 12)), seq_id))
    steps = [run_step(scheduler) for _ in range(3)]
    # 20 prompt tokens a step, first come first served: the first prompt is done after one step and decodes from
    # the next; the second finishes its prompt in the second step; the decode never waits.
    assert steps == [{0: 1, 1: 12, 2: 8}, {0: 1, 1: 1, 2: 4, 3: 12}, {0: 1, 1: 1, 2: 1, 3: 1}]
    assert all(sum(n for n in step.values() if n > 1) <= 20 for step in steps)


def test_a_prefill_that_finds_the_steps_prompt_tokens_spent_waits_without_losing_its_place() -> None:
    scheduler = Scheduler(BlockManager(num_blocks=128, block_size=4, enable_prefix_caching=False), max_num_seqs=8,
                          max_num_batched_tokens=64, long_prefill_token_threshold=0, max_prefill_tokens_per_step=8)
    scheduler.add(sequence(list(range(100, 120)), 1))
    scheduler.add(sequence(list(range(200, 204)), 2))
    # The older prompt has the step's 8 prompt tokens until it is done; the newcomer then follows in the same step.
    assert [run_step(scheduler) for _ in range(3)] == [{1: 8}, {1: 8}, {1: 4, 2: 4}]


def test_without_a_step_cap_a_burst_of_prompts_shares_the_whole_budget() -> None:
    scheduler = Scheduler(BlockManager(num_blocks=128, block_size=4, enable_prefix_caching=False), max_num_seqs=8,
                          max_num_batched_tokens=64, long_prefill_token_threshold=16, max_prefill_tokens_per_step=0)
    decoding(scheduler, 0)
    for seq_id in (1, 2, 3):
        scheduler.add(sequence(list(range(10 * seq_id, 10 * seq_id + 12)), seq_id))
    assert run_step(scheduler) == {0: 1, 1: 12, 2: 12, 3: 12}


def test_a_prompt_alone_in_the_engine_takes_the_whole_budget() -> None:
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False), max_num_seqs=8,
                          max_num_batched_tokens=64, long_prefill_token_threshold=16, max_prefill_tokens_per_step=20)
    scheduler.add(sequence(list(range(10, 210)), 1))
    assert [run_step(scheduler) for _ in range(4)] == [{1: 64}, {1: 64}, {1: 64}, {1: 8}]
