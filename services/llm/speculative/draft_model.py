"""Draft-model speculation: a smaller model with the same tokenizer guesses the next tokens greedily.

The draft keeps its own KV pool, laid out in the target's blocks (same block ids, same slots), so the
target's block tables serve both and preemption, prefix caching and rollback need nothing of their own.
`Sequence.num_draft_computed` counts the tokens whose draft KV is written; the block manager zeroes it when it
frees the sequence's blocks, and a sequence admitted on cached blocks recomputes its draft KV from the start
(the draft may not have run over those blocks). Proposals are the draft's argmax, a deterministic proposal,
so the target's rejection sampling keeps the output distribution exact.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from services.llm.loader import load_model

if TYPE_CHECKING:
    from services.llm.config import ModelConfig
    from services.llm.engine.sequence import Sequence

log = logging.getLogger(__name__)


class DraftModelProposer:
    def __init__(self, model: str, target: ModelConfig, device: torch.device, dtype: torch.dtype, block_size: int,
                 num_blocks: int) -> None:
        from services.llm.engine.runner import allocate_kv_cache, kv_bytes_per_block

        loaded = load_model(model, device, dtype)
        config = loaded.config
        if config.vocab_size != target.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({config.vocab_size} tokens) is not the target's "
                             f"({target.vocab_size}); a draft model must share the target's tokenizer")
        self.model, self.device, self.block_size = loaded.model, device, block_size
        self.kv_bytes_per_token = kv_bytes_per_block(config, 1, dtype) // config.num_layers
        self.kv_cache = allocate_kv_cache(self.model, config, num_blocks, block_size, dtype, device)
        log.info("draft model %s: %d layers, KV pool of %.2f GiB", loaded.name, config.num_layers,
                 kv_bytes_per_block(config, block_size, dtype) * num_blocks / 2**30)

    @torch.inference_mode()
    def propose(self, seqs: list[Sequence], num_slots: list[int]) -> list[list[int]]:
        drafts: list[list[int]] = [[] for _ in seqs]
        # First pass: each sequence's tokens the draft has not seen yet (often just the last one), one draft each.
        token_lists = [seq.token_ids[seq.num_draft_computed:] for seq in seqs]
        starts = [seq.num_draft_computed for seq in seqs]
        firsts = self._next_tokens(token_lists, starts, [seq.block_table for seq in seqs])
        for seq, draft, token in zip(seqs, drafts, firsts, strict=True):
            seq.num_draft_computed = seq.num_tokens
            draft.append(token)
        # Then one token at a time for the sequences that have room for more.
        while True:
            active = [i for i, slots in enumerate(num_slots) if len(drafts[i]) < slots]
            if not active:
                break
            tokens = self._next_tokens([[drafts[i][-1]] for i in active],
                                       [seqs[i].num_tokens + len(drafts[i]) - 1 for i in active],
                                       [seqs[i].block_table for i in active])
            for i, token in zip(active, tokens, strict=True):
                drafts[i].append(token)
        return drafts

    def _next_tokens(self, token_lists: list[list[int]], starts: list[int], block_tables: list[list[int]]
                     ) -> list[int]:
        from services.llm.engine.runner import pack_step

        packed = pack_step(token_lists, starts, block_tables, self.block_size, self.kv_bytes_per_token, self.device)
        hidden = self.model(packed.input_ids, packed.positions, packed.meta)
        last = torch.tensor(packed.ends, device=self.device) - 1
        return self.model.compute_logits(hidden[last]).argmax(dim=-1).tolist()
