"""Runs one scheduled batch through the model: pack the step's tokens, forward, sample.

Owns the model, the per-layer KV cache tensors, the sampler and the speculative proposer, if any: a decode
the scheduler left room behind gets the proposer's draft tokens as extra inputs, and the sampler's
verification decides how many of them stand (their KV past that point is dead, and the engine gives back
the blocks that held only them). Inputs are built with a handful of tensor
ops (no per-token Python) because on CPU the per-step overhead is a visible share of decode time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from services.llm.config import ModelConfig
from services.llm.engine.cpu_threads import CpuThreads
from services.llm.engine.sampling_params import SamplingParams
from services.llm.engine.scheduler import ScheduledBatch
from services.llm.engine.sequence import Sequence
from services.llm.guided import GuidedDecoder
from services.llm.kernels.attention_cpu import plan_cpu_attention
from services.llm.kernels.dispatch import use_triton_on
from services.llm.kernels.kv_store import FP8_KV_DTYPE, fp8_kv_scale
from services.llm.kernels.paged_attention_cpu import DecodeKernel, PrefillKernel
from services.llm.layers.attention import AttentionMetadata
from services.llm.layers.lora import LoRABatch
from services.llm.layers.sampler import LogitsMask, Sampler, SamplingRow
from services.llm.speculative import Proposer

if TYPE_CHECKING:
    from services.llm.kernels.cuda_graphs import DecodeGraphRunner

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepOutput:
    """What one step produced: per batch position, the tokens whose KV is now in the cache; per sequence that
    reached its last token, the tokens it gained (one, or more when drafts were accepted) and their logprobs."""
    num_computed: list[int]
    seqs: list[Sequence] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # each of `seqs`' place in the batch
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[tuple[float, list[tuple[int, float]]] | None]] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass(slots=True)
class PackedStep:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    ends: list[int]  # where each sequence's tokens end in the packed step


def pack_step(token_lists: list[list[int]], starts: list[int], block_table_lists: list[list[int]], block_size: int,
              kv_bytes_per_token: int, device: torch.device, attention_kernel: DecodeKernel | None = None,
              prefill_kernel: PrefillKernel | None = None) -> PackedStep:
    """A step's model inputs: sequence i feeds `token_lists[i]` at positions from `starts[i]` on, its keys and
    values going to the blocks of `block_table_lists[i]`. Built with a handful of tensor ops. `attention_kernel`
    and `prefill_kernel`: the CPU decode and prefill attention kernels, if the engine has them."""
    tokens = [token for token_list in token_lists for token in token_list]
    batch = len(token_lists)
    num_new = torch.tensor([len(token_list) for token_list in token_lists], dtype=torch.int32)
    start_t = torch.tensor(starts, dtype=torch.int32)
    seq_lens = start_t + num_new
    cu_seqlens = torch.zeros(batch + 1, dtype=torch.int32)
    torch.cumsum(num_new, 0, out=cu_seqlens[1:])
    width = max(len(table) for table in block_table_lists)
    block_tables = torch.tensor([table + [0] * (width - len(table)) for table in block_table_lists],
                                dtype=torch.int32)
    decode_only = len(tokens) == batch
    if decode_only:
        positions = start_t.long()
        owner = torch.arange(batch)
    else:
        owner = torch.repeat_interleave(torch.arange(batch), num_new)
        positions = (torch.arange(len(tokens)) - cu_seqlens[:-1].long()[owner]) + start_t.long()[owner]
    slot_mapping = block_tables[owner, positions // block_size].long() * block_size + positions % block_size
    cpu_plan = None
    if device.type == "cpu" and not use_triton_on(device):  # the interpreter tests route CPU to Triton
        cpu_plan = plan_cpu_attention(num_new.tolist(), seq_lens.tolist(), block_tables, slot_mapping, block_size,
                                      kv_bytes_per_token, attention_kernel, prefill_kernel)
    meta = AttentionMetadata(slot_mapping=slot_mapping.to(device), block_tables=block_tables.to(device),
                             cu_seqlens_q=cu_seqlens.to(device), seq_lens=seq_lens.to(device),
                             decode_only=decode_only, max_query_len=max(len(t) for t in token_lists),
                             cpu_plan=cpu_plan)
    return PackedStep(input_ids=torch.tensor(tokens, dtype=torch.long).to(device), positions=positions.to(device),
                      meta=meta, ends=cu_seqlens[1:].tolist())


KV_CACHE_DTYPES = {"fp8": FP8_KV_DTYPE, "fp8_e4m3": FP8_KV_DTYPE}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    """`LLM_KV_CACHE_DTYPE`: `auto` (the model's dtype) or `fp8` / `fp8_e4m3` (one byte per element)."""
    if name == "auto":
        return model_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"unknown KV cache dtype {name!r}; choose auto or one of {sorted(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name]


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element


def allocate_kv_cache(model: nn.Module, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The KV pool, one (keys, values) pair per layer, bound to the model's attention layers; an fp8 pool with
    each layer's key and value scales (powers of two from the layer's bounds, see `kv_store`)."""
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    # empty + zero_ writes every page now: a lazily mapped pool faults pages in mid-step, tens of ms each.
    kv_cache = [(torch.empty(shape, dtype=dtype, device=device).zero_(),
                 torch.empty(shape, dtype=dtype, device=device).zero_()) for _ in range(config.num_layers)]
    scales = [(fp8_kv_scale(k), fp8_kv_scale(v)) for k, v in model.kv_bounds()] if dtype == FP8_KV_DTYPE \
        else [(1.0, 1.0)] * config.num_layers
    for layer, (k_cache, v_cache), (k_scale, v_scale) in zip(model.attention_layers(), kv_cache, scales, strict=True):
        layer.bind_cache(k_cache, v_cache, k_scale, v_scale)
    return kv_cache


def decode_graph_buffers(max_batch: int, max_blocks: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The static inputs the decode graphs are captured on (`cuda_graphs.DecodeGraphRunner`)."""
    return {"input_ids": torch.zeros(max_batch, dtype=torch.long, device=device),
            "positions": torch.zeros(max_batch, dtype=torch.long, device=device),
            "slot_mapping": torch.full((max_batch,), -1, dtype=torch.long, device=device),
            "block_tables": torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device),
            "seq_lens": torch.zeros(max_batch, dtype=torch.int32, device=device)}


class ModelRunner:
    def __init__(self, model: nn.Module, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                 block_size: int, num_blocks: int, eos_token_ids: set[int], seed: int,
                 proposer: Proposer | None = None, lora_batch: LoRABatch | None = None,
                 guided: GuidedDecoder | None = None, kv_dtype: torch.dtype | None = None,
                 attention_kernel: DecodeKernel | None = None, prefill_kernel: PrefillKernel | None = None,
                 cpu_threads: CpuThreads | None = None) -> None:
        """`kv_dtype`: the KV pool's element type (None: the model's `dtype`); `attention_kernel` and
        `prefill_kernel`: CPU decodes and prefills attend in these C kernels (None: the torch path);
        `cpu_threads`: sets torch's CPU threads for each step's tokens, drafts included (None: they stay)."""
        self.model, self.config, self.device, self.dtype = model, config, device, dtype
        self.cpu_threads = cpu_threads
        self.block_size = block_size
        self.kv_dtype = kv_dtype or dtype
        self.kv_bytes_per_token = kv_bytes_per_block(config, 1, self.kv_dtype) // config.num_layers
        self.eos_token_ids = sorted(eos_token_ids)
        self.kv_cache = allocate_kv_cache(model, config, num_blocks, block_size, self.kv_dtype, device)
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        self.sampler = Sampler(generator)
        self.guided = guided
        self.decode_graphs: DecodeGraphRunner | None = None
        self.proposer = proposer
        self.lora_batch = lora_batch  # the LoRA layers' step mapping, when the model has them
        self.attention_kernel = attention_kernel
        self.prefill_kernel = prefill_kernel

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> None:
        """CUDA only, after the KV pool exists: decode-only steps of up to `max_batch` sequences replay graphs."""
        from services.llm.kernels.cuda_graphs import DecodeGraphRunner

        buffers = decode_graph_buffers(max_batch, -(-max_model_len // self.block_size), self.device)
        padding = {"slot_mapping": -1, "seq_lens": 0}  # padding rows write no cache slot and attend to nothing
        self.decode_graphs = DecodeGraphRunner(self._decode_hidden, buffers, padding=padding)
        self.decode_graphs.capture()

    def _decode_hidden(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        # The graphs end at the hidden states: the LM head is one GEMM (nothing to gain from a graph) and run
        # eagerly it computes logits for the live rows only, with no [batch, vocab] output held per graph.
        # The decode kernels never read cu_seqlens_q; seq_lens stands in so no tensor is made during capture.
        meta = AttentionMetadata(slot_mapping=x["slot_mapping"], block_tables=x["block_tables"],
                                 cu_seqlens_q=x["seq_lens"], seq_lens=x["seq_lens"], decode_only=True,
                                 max_query_len=1)
        return self.model(x["input_ids"], x["positions"], meta)

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        """Runs the batch: each sequence's scheduled tokens, plus the drafts the proposer offers in the room the
        scheduler reserved behind a decode; sequences that reach their last token get one token or more."""
        drafts = self._drafts(batch)
        input_ids, positions, meta, logit_rows, step = self._prepare(batch, drafts)
        if self.cpu_threads is not None:
            # The tokens the step runs: the room reserved for drafts counts only where the proposer filled it.
            self.cpu_threads.before_step(len(input_ids))
        if not step.seqs:
            self.model(input_ids, positions, meta)
            return step
        # Grammar masks of constrained rows are filled on a worker thread while the model runs (constrained
        # sequences get no drafts, so each has one logit row).
        masks = self.guided.start(step.seqs, self._first_rows(step, drafts), len(logit_rows)) \
            if self.guided is not None else None
        graphs = self.decode_graphs
        if graphs is not None and meta.decode_only and graphs.padded_size(len(batch)) is not None \
                and meta.block_tables.shape[1] <= graphs.buffers["block_tables"].shape[1]:
            hidden = graphs.run({"input_ids": input_ids, "positions": positions, "slot_mapping": meta.slot_mapping,
                                 "block_tables": meta.block_tables, "seq_lens": meta.seq_lens})
            logits = self.model.compute_logits(hidden[logit_rows])
        else:
            logits = self.model.compute_logits(self.model(input_ids, positions, meta)[logit_rows])
        if drafts is None:
            sampled = self.sampler(logits, [self._sampling_row(seq) for seq in step.seqs], masks)
            step.token_ids = [[token] for token in sampled.token_ids]
            step.logprobs = [[logprob] for logprob in sampled.logprobs]
            return step
        self._verify(logits, step, drafts, masks)
        return step

    @staticmethod
    def _first_rows(step: StepOutput, drafts: dict[int, list[int]] | None) -> list[int]:
        """The logit row where each of the step's sequences starts (each has its drafts' rows plus one)."""
        rows, row = [], 0
        for position in step.positions:
            rows.append(row)
            row += 1 + (len(drafts.get(position, [])) if drafts is not None else 0)
        return rows

    def _drafts(self, batch: ScheduledBatch) -> dict[int, list[int]] | None:
        """Draft tokens by position in the batch, for the sequences the scheduler gave room for them."""
        if self.proposer is None:
            return None
        slots = [seq.num_computed_tokens + num_new - seq.num_tokens
                 for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=True)]
        # A constrained sequence gets no drafts: its grammar could not check tokens it has not yet accepted.
        positions = [i for i, n in enumerate(slots) if n > 0 and batch.seqs[i].grammar is None]
        if not positions:
            return None
        proposed = self.proposer.propose([batch.seqs[i] for i in positions], [slots[i] for i in positions])
        drafts = {i: tokens[:slots[i]] for i, tokens in zip(positions, proposed, strict=True) if tokens}
        return drafts or None

    def _verify(self, logits: torch.Tensor, step: StepOutput, drafts: dict[int, list[int]],
                masks: LogitsMask | None) -> None:
        """Rejection sampling over each sequence's rows: accepted drafts, then one token from the target."""
        rows: list[SamplingRow] = []
        row_drafts: list[int] = []
        for seq, position in zip(step.seqs, step.positions, strict=True):
            seq_drafts = drafts.get(position, [])
            for j in range(len(seq_drafts) + 1):
                rows.append(self._sampling_row(seq, j))
                row_drafts.append(seq_drafts[j] if j < len(seq_drafts) else -1)
        sampled, accepted = self.sampler.verify(logits, rows, row_drafts, masks)
        first = 0
        for position in step.positions:
            num_drafts = len(drafts.get(position, []))
            taken = 0
            while taken < num_drafts and accepted[first + taken]:
                taken += 1
            step.token_ids.append(sampled.token_ids[first:first + taken + 1])
            step.logprobs.append(sampled.logprobs[first:first + taken + 1])
            # The KV of rejected drafts stays in slots past the sequence's end, to be overwritten.
            step.num_computed[position] -= num_drafts - taken
            step.num_draft_tokens += num_drafts
            step.num_accepted_tokens += taken
            first += num_drafts + 1

    def _prepare(self, batch: ScheduledBatch, drafts: dict[int, list[int]] | None
                 ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor, StepOutput]:
        token_lists = []
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            start = seq.num_computed_tokens
            tokens = seq.token_ids[start:start + num_new]  # room reserved for drafts lies past the known tokens
            token_lists.append(tokens + drafts[i] if drafts is not None and i in drafts else tokens)
        packed = pack_step(token_lists, [seq.num_computed_tokens for seq in batch.seqs],
                           [seq.block_table for seq in batch.seqs], self.block_size, self.kv_bytes_per_token,
                           self.device, self.attention_kernel, self.prefill_kernel)
        if self.lora_batch is not None:
            self._bind_loras(batch.seqs, [len(tokens) for tokens in token_lists])
        step = StepOutput(num_computed=[len(tokens) for tokens in token_lists])
        logit_rows: list[int] = []
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            if seq.num_computed_tokens + num_new >= seq.num_tokens:  # reaches its last known token
                num_drafts = len(drafts.get(i, [])) if drafts is not None else 0
                end = packed.ends[i]
                logit_rows += range(end - num_drafts - 1, end)
                step.seqs.append(seq)
                step.positions.append(i)
        rows = torch.tensor(logit_rows, dtype=torch.long).to(self.device)
        return packed.input_ids, packed.positions, packed.meta, rows, step

    def _bind_loras(self, seqs: list[Sequence], q_lens: list[int]) -> None:
        """Tells the LoRA layers which adapter slot each of the step's tokens uses."""
        lora_batch = self.lora_batch
        assert lora_batch is not None
        seq_slots = [seq.request.lora.slot if seq.request.lora is not None else -1 for seq in seqs]
        used = sorted({slot for slot in seq_slots if slot >= 0})
        if not used:
            lora_batch.slots = lora_batch.mask = None
            return
        column = [used.index(slot) if slot >= 0 else -1 for slot in seq_slots]
        token_column = torch.repeat_interleave(torch.tensor(column), torch.tensor(q_lens))
        mask = token_column[:, None] == torch.arange(len(used))[None, :]
        lora_batch.slots = torch.tensor(used, dtype=torch.long, device=self.device)
        lora_batch.mask = mask.to(device=self.device, dtype=self.dtype)[:, :, None]

    def _sampling_row(self, seq: Sequence, ahead: int = 0) -> SamplingRow:
        """`ahead`: how many draft tokens come before this row's token (speculation's later rows)."""
        params = seq.params
        banned: list[int] = []
        if seq.num_output_tokens + ahead < params.min_tokens:
            banned = list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids)
        uses_history = params.uses_penalties
        return SamplingRow(params=params,
                           prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens] if uses_history else [],
                           output_token_ids=seq.output_token_ids if uses_history else [],
                           generator=seq.generator, banned_token_ids=banned)


@torch.inference_mode()
def warm_up_step(model: nn.Module, config: ModelConfig, device: torch.device, dtype: torch.dtype, block_size: int,
                 num_tokens: int, num_sampled: int, kv_dtype: torch.dtype | None = None) -> None:
    """The most memory a step can take: a prefill of `num_tokens` tokens against a throwaway cache just big
    enough, then `num_sampled` rows sampled with every filter and logprobs (sorting the vocabulary for each
    row is the sampler's peak). Runs on any device; `warm_up_peak_bytes` measures it on a GPU."""
    num_blocks = -(-num_tokens // block_size)
    allocate_kv_cache(model, config, num_blocks, block_size, kv_dtype or dtype, device)
    positions = torch.arange(num_tokens, device=device)
    meta = AttentionMetadata(slot_mapping=positions.clone(),
                             block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None, :],
                             cu_seqlens_q=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
                             seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
                             decode_only=False, max_query_len=num_tokens)
    input_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    hidden = model(input_ids, positions, meta)
    num_sampled = max(1, min(num_sampled, num_tokens))
    logits = model.compute_logits(hidden[-num_sampled:])
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01, logprobs=20)
    rows = [SamplingRow(params=params, prompt_token_ids=[], output_token_ids=[], generator=None, banned_token_ids=[])
            for _ in range(num_sampled)]
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    Sampler(generator)(logits, rows)
    for layer in model.attention_layers():  # let the throwaway cache go before the pool is sized
        layer.bind_cache(torch.empty(0, device=device), torch.empty(0, device=device))


def warm_up_peak_bytes(model: nn.Module, config: ModelConfig, device: torch.device, dtype: torch.dtype,
                       block_size: int, num_tokens: int, num_sampled: int,
                       kv_dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(peak, held): device memory at the warm-up step's peak, and what stays allocated after it (the weights)."""
    warm_up_step(model, config, device, dtype, block_size, num_tokens, num_sampled, kv_dtype)
    torch.cuda.synchronize(device)
    peak, held = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
    torch.cuda.empty_cache()
    log.info("warm-up step of %d tokens, %d sampled, peaks at %.2f GiB (%.2f GiB held after it)", num_tokens,
             num_sampled, peak / 2**30, held / 2**30)
    return peak, held
