"""The block pool on its own: reference counts, prefix reuse, LRU eviction of freed cached blocks."""

from __future__ import annotations

import torch

from services.llm.engine.block_manager import BlockManager, chain_hash
from services.llm.engine.outputs import RequestTimings
from services.llm.engine.sampling_params import SamplingParams
from services.llm.engine.sequence import Request, Sequence


def sequence(tokens: list[int], seq_id: int = 0) -> Sequence:
    request = Request(request_id=str(seq_id), prompt_token_ids=tokens, params=SamplingParams(),
                      timings=RequestTimings(arrival=0.0))
    return Sequence(seq_id=seq_id, request=request, index=0, token_ids=list(tokens), num_prompt_tokens=len(tokens),
                    generator=None)


def run_prefill(manager: BlockManager, seq: Sequence) -> None:
    """Admits the whole prompt and marks it computed, as one engine step would."""
    cached = manager.prefix_match(seq)
    num_new = seq.num_tokens - len(cached) * manager.block_size
    assert manager.can_admit(cached, num_new)
    manager.admit(seq, cached, num_new)
    seq.num_computed_tokens += num_new
    manager.commit_computed_blocks(seq)


def test_shared_prefix_reuses_blocks_and_counts_references() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first, second = sequence(list(range(10)), 0), sequence([*range(8), 99, 98], 1)
    run_prefill(manager, first)
    assert len(first.block_table) == 3 and manager.num_free_blocks == 5
    run_prefill(manager, second)
    assert second.block_table[:2] == first.block_table[:2]  # the two full blocks of tokens 0..7
    assert second.block_table[2] != first.block_table[2]
    assert [manager.ref_counts[b] for b in first.block_table] == [2, 2, 1]
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 8 and not any(manager.ref_counts)


def test_whole_prompt_cached_still_leaves_a_token_to_compute() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    first = sequence(list(range(8)))
    run_prefill(manager, first)
    manager.free(first)
    again = sequence(list(range(8)), 1)
    assert len(manager.prefix_match(again)) == 1


def test_freed_cached_blocks_survive_until_space_is_needed_then_oldest_go_first() -> None:
    manager = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=True)
    old, recent = sequence(list(range(100, 109)), 0), sequence(list(range(200, 209)), 1)
    run_prefill(manager, old)  # 2 full blocks + 1 partial
    manager.free(old)
    # Takes 3 of the 4 blocks: the never-used one, then old's tail blocks (freed tail first).
    run_prefill(manager, recent)
    manager.free(recent)
    assert len(manager.prefix_match(sequence(list(range(200, 209)), 2))) == 2
    assert len(manager.prefix_match(sequence(list(range(100, 109)), 3))) == 1  # old's first block survived


def test_disabled_prefix_caching_never_matches() -> None:
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    first = sequence(list(range(12)))
    run_prefill(manager, first)
    assert manager.prefix_match(sequence(list(range(12)), 1)) == []
    manager.free(first)
    assert manager.num_free_blocks == 8


def test_usage_counts_only_held_blocks() -> None:
    manager = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=True)
    seq = sequence(list(range(20)))
    run_prefill(manager, seq)
    assert manager.usage == torch.tensor(0.5).item()
    manager.free(seq)
    assert manager.usage == 0.0


# CPython's tuple hash (xxHash-style lanes, Objects/tupleobject.c) is invertible in its last item, so a block that
# collides with any given one under `hash()` can be built on purpose.
_MASK, _P1, _P2, _P5 = 2**64 - 1, 11400714785074694791, 14029467366897019727, 2870177450012600261


def _tuple_hash_state(items: list[int]) -> int:
    acc = _P5
    for item in items:
        acc = (acc + (hash(item) & _MASK) * _P2) & _MASK
        acc = (((acc << 31) | (acc >> 33)) & _MASK) * _P1 & _MASK
    return acc


def python_hash_collision(tokens: list[int]) -> list[int]:
    """Different tokens whose tuple has the same Python `hash()` as `tokens`' (the last two ids change)."""
    target = _tuple_hash_state(tokens) * pow(_P1, -1, 2**64) & _MASK
    target = ((target >> 31) | (target << 33)) & _MASK  # undo the last lane's rotation
    for second_last in range(10**6, 10**6 + 1000):
        lane = (target - _tuple_hash_state([*tokens[:-2], second_last])) * pow(_P2, -1, 2**64) & _MASK
        if lane < 2**61 - 1:  # an int below the hash modulus hashes to itself
            return [*tokens[:-2], second_last, lane]
    raise AssertionError("no collision found")


def test_a_crafted_python_hash_collision_does_not_share_kv() -> None:
    victim = [11, 12, 13, 14]
    forged = python_hash_collision(victim)
    assert forged != victim and hash(tuple(forged)) == hash(tuple(victim))
    manager = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    run_prefill(manager, sequence([*victim, 15], 0))
    assert manager.prefix_match(sequence([*forged, 15], 1)) == []
    assert len(manager.prefix_match(sequence([*victim, 99], 2))) == 1  # the real prefix still hits


def test_block_keys_chain_over_the_whole_prefix() -> None:
    first, second = chain_hash(None, [1, 2, 3, 4]), chain_hash(None, [1, 2, 3, 5])
    assert first != second and len(first) == 32
    # The same block after different prefixes is a different key.
    assert chain_hash(first, [7, 8, 9, 10]) != chain_hash(second, [7, 8, 9, 10])
    assert chain_hash(first, [7, 8, 9, 10]) == chain_hash(chain_hash(None, [1, 2, 3, 4]), [7, 8, 9, 10])
