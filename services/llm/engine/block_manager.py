"""The KV cache's block pool: per-sequence block tables, reference counts and automatic prefix caching.

A full block is identified by a SHA-256 hash chained over every token up to its end, so equal prefixes map
to equal blocks and different ones never meet (a collision would serve one request another prompt's KV).
Freed blocks keep their contents and hash in the free queue; they are reused by a matching prefix for free,
and evicted oldest-first only when a fresh block is needed.
A request's cache salt (its LoRA adapter's) starts the chain, so KV computed under different weights never meets.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from services.llm.engine.sequence import Sequence


def chain_hash(previous: bytes | None, tokens: list[int]) -> bytes:
    """The block's key: SHA-256 over its parent's key and its token ids (int64), not Python's `hash()`, whose
    collisions can be crafted (vLLM's CVE-2025-25183)."""
    return hashlib.sha256((previous or b"") + array("q", tokens).tobytes()).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # chain hash -> block holding that prefix
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evict first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def prefix_match(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of `seq`; at least one token is always left to compute."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._hash_full_blocks(seq, max_blocks)
        matched = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self.cached.get(block_hash)
            if block is None:
                break
            matched.append(block)
        return matched

    def can_admit(self, cached_blocks: list[int], num_new_tokens: int) -> bool:
        fresh = self.blocks_for(len(cached_blocks) * self.block_size + num_new_tokens) - len(cached_blocks)
        # Cached blocks nobody holds sit in the free queue: taking them shrinks it too.
        revived = sum(1 for block in cached_blocks if self.ref_counts[block] == 0)
        return fresh <= self.num_free_blocks - revived

    def admit(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> None:
        assert not seq.block_table and seq.num_computed_tokens == 0
        for block in cached_blocks:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1
        seq.block_table = list(cached_blocks)
        seq.num_cached_blocks = len(cached_blocks)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size
        self.grow(seq, num_new_tokens)

    def room_for(self, seq: Sequence) -> int:
        """How many more tokens `seq` could compute with its blocks plus every free one."""
        return (len(seq.block_table) + self.num_free_blocks) * self.block_size - seq.num_computed_tokens

    def room_after(self, cached_blocks: list[int]) -> int:
        """How many new tokens a sequence admitted on `cached_blocks` could compute with the free blocks."""
        revived = sum(1 for block in cached_blocks if self.ref_counts[block] == 0)
        return (self.num_free_blocks - revived) * self.block_size

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        assert needed <= self.num_free_blocks, "grow() without can_grow()"
        for _ in range(needed):
            seq.block_table.append(self._take_fresh_block())

    def release_unused(self, seq: Sequence) -> None:
        """Returns the blocks past the sequence's computed tokens (room a speculative step held for drafts that
        were rejected). They were taken fresh this step, so nobody else holds them and no hash names them."""
        keep = self.blocks_for(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            assert self.ref_counts[block] == 1 and self.block_hashes[block] is None
            self.ref_counts[block] = 0
            self.free_queue[block] = None
            self.free_queue.move_to_end(block, last=False)  # empty: reuse it before blocks holding a prefix

    def commit_computed_blocks(self, seq: Sequence) -> None:
        """Publishes the sequence's newly completed blocks to the prefix cache, once their KV is written and their
        tokens are known (the KV of accepted draft tokens is written a step before they join the sequence)."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        self._hash_full_blocks(seq, full)
        for i in range(seq.num_cached_blocks, full):
            block, block_hash = seq.block_table[i], seq.block_hashes[i]
            if self.block_hashes[block] is None:
                self.block_hashes[block] = block_hash
                self.cached.setdefault(block_hash, block)
        seq.num_cached_blocks = max(seq.num_cached_blocks, full)

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so the queue evicts a sequence's ends before the prefixes others may share.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free_queue[block] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        seq.num_draft_computed = 0

    def _take_fresh_block(self) -> int:
        block, _ = self.free_queue.popitem(last=False)
        assert self.ref_counts[block] == 0
        old_hash = self.block_hashes[block]
        if old_hash is not None:
            if self.cached.get(old_hash) == block:
                del self.cached[old_hash]
            self.block_hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def _hash_full_blocks(self, seq: Sequence, num_blocks: int) -> None:
        size = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else seq.request.cache_salt
            hashes.append(chain_hash(parent, seq.token_ids[i * size:(i + 1) * size]))
