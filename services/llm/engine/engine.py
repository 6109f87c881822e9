"""The engine: requests in, tokens out, one `step()` at a time.

A step is schedule → run the model → post-process. `add_request`, `step` and `abort` may be called from
different threads: a lock serializes them, and an abort that arrives mid-step is applied as the step ends.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from common import c_build
from services.llm.config import ModelConfig
from services.llm.engine.block_manager import BlockManager
from services.llm.engine.cpu_threads import CpuThreads
from services.llm.engine.gpu_memory import plan_kv_budget
from services.llm.engine.outputs import CompletionOutput, EngineStats, RequestOutput, RequestTimings, TokenLogprob
from services.llm.engine.runner import ModelRunner, StepOutput, kv_bytes_per_block, resolve_kv_cache_dtype
from services.llm.engine.sampling_params import SamplingParams
from services.llm.engine.scheduler import ScheduledBatch, Scheduler
from services.llm.engine.sequence import Request, Sequence
from services.llm.guided import GuidedDecoder
from services.llm.kernels import cpu_compiled, elementwise_cpu, matmul_cpu, paged_attention_cpu
from services.llm.kernels.dispatch import use_triton_on
from services.llm.kernels.hardware import detect_hardware, use_given_cores
from services.llm.kernels.kv_store import FP8_KV_DTYPE
from services.llm.layers.activation import SiluAndMul
from services.llm.layers.lora import add_lora_layers
from services.llm.layers.norm import RMSNorm
from services.llm.layers.packed_linear import PackedLinear
from services.llm.layers.rotary import RotaryEmbedding
from services.llm.loader import LoadedModel, load_model, resolve_device, resolve_dtype
from services.llm.lora_adapters import LoRAAdapter, LoRAAdapters, read_peft_adapter
from services.llm.speculative import SpeculativeConfig, build_proposer

log = logging.getLogger(__name__)

# Decode batches up to this size replay CUDA graphs; bigger ones are compute-bound and gain little from them.
MAX_GRAPH_BATCH = 256


@dataclass(slots=True)
class EngineConfig:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    block_size: int | None = None  # None: the hardware profile's
    kv_cache_gib: float = 1.0  # CPU: the KV pool's size
    gpu_memory_utilization: float = 0.85  # GPU: share of the card for weights, activations and KV pool
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    long_prefill_token_threshold: int = 512  # most tokens of one prefill per step while others run; 0: no cap
    max_prefill_tokens_per_step: int = 0  # all prefills of a step while others run; 0: no cap
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    enable_cuda_graphs: bool = True  # decode steps replay captured graphs where the hardware profile allows
    num_kv_blocks: int | None = None  # a fixed KV pool size in blocks, on any device (tests, benchmarks)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    max_loras: int = 0  # LoRA adapter slots (0: no LoRA layers at all)
    max_lora_rank: int = 16
    quantization: str = "none"  # weight format of the decoder projections: none, int8 or fp8 (weight-only)
    kv_cache_dtype: str = "auto"  # the KV pool's element type: auto (the model's dtype) or fp8 (e4m3)
    cpu_weight_packing: bool = True  # CPU bf16: linear weights in oneDNN's packed layout (same outputs, faster)
    gguf_weights: str = "auto"  # a .gguf's Q8_0/Q4_*/Q6_K projections: native (blocks), dequantize, or auto
    cpu_compile: bool = True  # CPU bf16: prefill-sized steps' elementwise kernels compiled (kernels/cpu_compiled)
    cpu_attention: str = "auto"  # CPU attention: kernel (C, kernels/paged_attention_cpu), torch, or auto
    cpu_elementwise: str = "auto"  # CPU steps under cpu_compiled.MIN_ROWS: norms, rotary, SiLU in C (elementwise_cpu)
    cpu_matmul: str = "auto"  # CPU steps of up to 32 tokens: packed bf16 linears in C (kernels/matmul_cpu)
    cpu_adaptive_threads: bool = True  # CPU: torch's threads follow the cores other processes leave (cpu_threads)
    # CPU, with adaptive threads: steps of up to this many tokens run on one thread fewer, leaving a core to a
    # front end in this process (the server sets it; cpu_threads gives the measurements); 0: none do
    cpu_front_end_core_tokens: int = 0

    def __post_init__(self) -> None:
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if self.max_prefill_tokens_per_step < 0:
            raise ValueError(f"max_prefill_tokens_per_step must be >= 0, got {self.max_prefill_tokens_per_step}")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError("max_loras must be >= 0 and max_lora_rank >= 1")
        resolve_kv_cache_dtype(self.kv_cache_dtype, torch.float32)  # an unknown name fails here
        if self.cpu_attention not in paged_attention_cpu.CHOICES:
            raise ValueError(f"cpu_attention must be one of {paged_attention_cpu.CHOICES}, got {self.cpu_attention!r}")
        if self.cpu_elementwise not in c_build.CHOICES:
            raise ValueError(f"cpu_elementwise must be one of {c_build.CHOICES}, got {self.cpu_elementwise!r}")
        if self.cpu_matmul not in c_build.CHOICES:
            raise ValueError(f"cpu_matmul must be one of {c_build.CHOICES}, got {self.cpu_matmul!r}")


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        started = time.perf_counter()
        # Like a NIM profile: the device picks dtype, kernels, block size and graphs unless configured.
        self.hardware = detect_hardware(self.device, None if config.dtype == "auto"
                                        else resolve_dtype(config.dtype, self.device))
        log.info("hardware profile: %s", self.hardware.describe())
        cpu_threads: CpuThreads | None = None
        if self.device.type == "cpu":
            log.info("torch uses %d CPU threads", use_given_cores())
            if config.cpu_adaptive_threads:
                cpu_threads = CpuThreads.for_this_process(config.cpu_front_end_core_tokens)
        self.dtype = self.hardware.dtype
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        self._check_fp8_support()
        self.block_size = config.block_size or self.hardware.kv_block_size
        # What the process held on the device before this engine began (another engine, the caller's tensors) is
        # not this engine's: the memory share counts only its own weights and step (see `_gpu_kv_budget`).
        self._device_memory_before = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        loaded = load_model(config.model, self.device, self.dtype, config.quantization,
                            pack_cpu_weights=config.cpu_weight_packing, gguf_weights=config.gguf_weights)
        self.loras: LoRAAdapters | None = None
        lora_batch = None
        if config.max_loras:
            lora_batch, lora_layers = add_lora_layers(loaded.model, config.max_loras, config.max_lora_rank)
            self.loras = LoRAAdapters(lora_layers, config.max_loras)
        if config.cpu_compile and self.device.type == "cpu" and self.dtype == torch.bfloat16 \
                and not use_triton_on(self.device):
            self._compile_cpu_kernels(loaded)
        self._use_cpu_elementwise_kernel(loaded)
        self._use_cpu_matmul_kernel(loaded)
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = loaded.name
        self.eos_token_ids = loaded.eos_token_ids
        self.max_model_len = self._max_model_len(loaded)
        num_blocks = self._num_kv_blocks(loaded)
        self.max_model_len = self._fit_context_to_pool(num_blocks)
        self.guided = GuidedDecoder(self.tokenizer, loaded.config.vocab_size, sorted(self.eos_token_ids))
        self.block_manager = BlockManager(num_blocks, self.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.long_prefill_token_threshold, config.speculative,
                                   config.max_prefill_tokens_per_step)
        proposer = build_proposer(config.speculative, loaded.config, self.device, self.dtype, self.block_size,
                                  num_blocks)
        attention_kernel = self._cpu_attention_kernel(loaded.config)
        self.runner = ModelRunner(loaded.model, loaded.config, self.device, self.dtype, self.block_size,
                                  num_blocks, self.eos_token_ids, config.seed, proposer, lora_batch, self.guided,
                                  self.kv_dtype, attention_kernel,
                                  self._cpu_prefill_kernel(attention_kernel, loaded.config), cpu_threads)
        # Graphs would freeze the step's adapter mapping: with LoRA layers every step runs eagerly.
        if self.hardware.use_cuda_graphs and self.hardware.kernels == "triton" and config.enable_cuda_graphs \
                and self.loras is None:
            self.runner.capture_decode_graphs(min(config.max_num_seqs, MAX_GRAPH_BATCH), self.max_model_len)
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._lock = threading.Lock()
        self._pending_aborts: deque[str] = deque()
        self._abort_outputs: list[RequestOutput] = []  # final outputs of requests ended between steps (abort, stop)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.draft_tokens_total = 0
        self.accepted_tokens_total = 0
        log.info("engine ready: %s on %s/%s, %d KV blocks of %d tokens in %s, max_model_len %d (%.1fs)",
                 self.model_name, self.device, self.dtype, num_blocks, self.block_size, self.kv_dtype,
                 self.max_model_len, time.perf_counter() - started)

    # ---- public API -------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None, lora_name: str | None = None) -> None:
        """`lora_name`: a loaded LoRA adapter to generate with (None: the base model)."""
        params.validate()
        self._validate_prompt(prompt_token_ids, params)
        if params.guided is not None:
            self.guided.compiler.compile(params.guided)  # a bad grammar fails here (ValueError); cached after
        with self._lock:
            if request_id in self.requests:
                raise ValueError(f"request id {request_id!r} is already in use")
            lora = self._lora(lora_name) if lora_name is not None else None
            request = Request(request_id=request_id, prompt_token_ids=list(prompt_token_ids), params=params,
                              timings=RequestTimings(arrival=arrival_time if arrival_time is not None else time.time()),
                              lora=lora)
            for index in range(params.n):
                request.seqs.append(self._new_sequence(request, index))
            first, *siblings = request.seqs
            # Siblings start once the first has its prompt in the cache, and then share those blocks.
            request.held_back = siblings
            self.requests[request_id] = request
            self.scheduler.add(first)

    def step(self) -> list[RequestOutput]:
        with self._lock:
            outputs, self._abort_outputs = self._abort_outputs, []
            batch = self.scheduler.schedule()
            if batch:
                self._mark_scheduled(batch)
                outputs += self._postprocess(batch, self.runner.execute(batch))
            while self._pending_aborts:
                self._abort_now(self._pending_aborts.popleft())
            return outputs

    def abort(self, request_id: str) -> None:
        """Stops a request wherever it is and frees its blocks; its final output (finish_reason "abort")
        comes from the next `step()`. Unknown or finished ids are ignored."""
        if self._lock.acquire(blocking=False):
            try:
                self._abort_now(request_id)
            finally:
                self._lock.release()
        else:
            self._pending_aborts.append(request_id)

    def finish_by_stop_string(self, request_id: str, index: int) -> None:
        """Ends choice `index` of a request whose text reached a stop string (matched where the text is
        detokenized): it is not scheduled again and its blocks are freed now, while its siblings go on. When it
        was the last one running, the request's final output comes from the next `step()`. Unknown ids and
        finished choices are ignored."""
        with self._lock:
            request = self.requests.get(request_id)
            if request is None or not 0 <= index < len(request.seqs) or request.seqs[index].is_finished:
                return
            seq = request.seqs[index]
            if seq in request.held_back:  # an n > 1 sibling that has not started yet
                request.held_back.remove(seq)
            self.scheduler.remove(seq)
            seq.finish_reason = "stop"
            if request.is_finished:
                del self.requests[request_id]
                request.timings.finished = time.time()
                self._abort_outputs.append(self._request_output(request))

    def load_lora(self, name: str, path: str) -> LoRAAdapter:
        """Loads a PEFT LoRA adapter into a free slot; requests name it to use it."""
        if self.loras is None:
            raise ValueError("LoRA is not enabled on this engine (max_loras is 0)")
        if name == self.model_name:
            raise ValueError(f"a LoRA adapter cannot take the base model's name {name!r}")
        peft = read_peft_adapter(Path(path))  # the disk read happens outside the lock: steps go on meanwhile
        with self._lock:
            adapter = self.loras.load(name, path, peft)
        log.info("loaded LoRA adapter %r (rank %d) from %s into slot %d", name, adapter.rank, path, adapter.slot)
        return adapter

    def unload_lora(self, name: str) -> None:
        """Frees an adapter's slot. Refused while requests for it are in the engine."""
        with self._lock:
            adapter = self._lora(name)
            users = sum(1 for request in self.requests.values() if request.lora is adapter)
            if users:
                raise ValueError(f"LoRA adapter {name!r} is in use by {users} request(s); unload it when they finish")
            self.loras.unload(name)  # type: ignore[union-attr]
        log.info("unloaded LoRA adapter %r", name)

    def lora_adapters(self) -> list[LoRAAdapter]:
        return list(self.loras.adapters.values()) if self.loras is not None else []

    def kv_cache_capacity(self) -> dict[str, object]:
        """The KV pool: its element type, how many blocks and tokens it holds, and how many it would hold in
        the model's dtype on the same memory (`capacity_gain`: 2.0 for an fp8 pool beside bf16 weights)."""
        blocks = self.block_manager.num_blocks
        at_model_dtype = self.kv_budget_bytes // kv_bytes_per_block(self.model_config, self.block_size, self.dtype)
        return {"dtype": str(self.kv_dtype).removeprefix("torch."), "blocks": blocks, "block_size": self.block_size,
                "tokens": blocks * self.block_size, "bytes": blocks * kv_bytes_per_block(
                    self.model_config, self.block_size, self.kv_dtype),
                "tokens_in_model_dtype": at_model_dtype * self.block_size,
                "capacity_gain": round(blocks / max(1, at_model_dtype), 3)}

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._abort_outputs) or bool(self._pending_aborts)

    def stats(self) -> EngineStats:
        manager, scheduler = self.block_manager, self.scheduler
        return EngineStats(num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
                           kv_usage=manager.usage, num_free_blocks=manager.num_free_blocks,
                           num_total_blocks=manager.num_blocks, prefix_cache_queries=scheduler.prefix_cache_queries,
                           prefix_cache_hits=scheduler.prefix_cache_hits, num_preemptions=scheduler.num_preemptions,
                           prompt_tokens_total=self.prompt_tokens_total,
                           generation_tokens_total=self.generation_tokens_total,
                           spec_draft_tokens_total=self.draft_tokens_total,
                           spec_accepted_tokens_total=self.accepted_tokens_total)

    def generate(self, prompts: list[list[int]] | list[str], params: SamplingParams | list[SamplingParams],
                 use_tqdm: bool = True, lora_names: list[str | None] | None = None) -> list[RequestOutput]:
        """Offline: runs the prompts to completion (each with its LoRA adapter, if `lora_names` names one),
        returns their final outputs in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        loras = lora_names if lora_names is not None else [None] * len(prompts)
        batch_id = next(self._seq_ids)
        ids = [f"generate-{batch_id}-{i}" for i in range(len(prompts))]
        for request_id, prompt, p, lora in zip(ids, prompts, params_list, loras, strict=True):
            token_ids = self.tokenizer(prompt)["input_ids"] if isinstance(prompt, str) else prompt
            self.add_request(request_id, token_ids, p, lora_name=lora)
        wanted = set(ids)
        finals: dict[str, RequestOutput] = {}
        logprobs: dict[tuple[str, int], list[TokenLogprob]] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as progress:
            while len(finals) < len(ids):
                for output in self.step():
                    if output.request_id not in wanted:
                        continue
                    for completion in output.outputs:
                        logprobs.setdefault((output.request_id, completion.index), []).extend(
                            completion.logprobs or [])
                    if output.finished:
                        finals[output.request_id] = output
                        progress.update(1)
        # Offline callers get whole completions: every token "new", every logprob gathered.
        for request_id, output in finals.items():
            for completion in output.outputs:
                completion.new_token_ids = list(completion.token_ids)
                if completion.logprobs is not None:
                    completion.logprobs = logprobs[(request_id, completion.index)]
        return [finals[request_id] for request_id in ids]

    # ---- internals --------------------------------------------------------------------------------------

    def _lora(self, name: str) -> LoRAAdapter:
        adapter = self.loras.get(name) if self.loras is not None else None
        if adapter is None:
            raise ValueError(f"no LoRA adapter named {name!r} is loaded")
        return adapter

    def _validate_prompt(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                             f"exceeds the model's context length of {self.max_model_len} tokens")

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        generator = None
        if request.params.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.params.seed + index)
        grammar = self.guided.new_state(request.params.guided) if request.params.guided is not None else None
        return Sequence(seq_id=next(self._seq_ids), request=request, index=index,
                        token_ids=list(request.prompt_token_ids), num_prompt_tokens=len(request.prompt_token_ids),
                        generator=generator, grammar=grammar)

    def _mark_scheduled(self, batch: ScheduledBatch) -> None:
        now = time.time()
        for seq in batch.seqs:
            request = seq.request
            if request.timings.first_scheduled is None:
                request.timings.first_scheduled = now
                request.num_cached_tokens = seq.num_computed_tokens
                self.prompt_tokens_total += seq.num_prompt_tokens

    def _postprocess(self, batch: ScheduledBatch, step: StepOutput) -> list[RequestOutput]:
        for seq, num_new, num_computed in zip(batch.seqs, batch.num_new_tokens, step.num_computed, strict=True):
            seq.num_computed_tokens += num_computed
            if num_computed < num_new:  # room for drafts that were rejected, or never proposed
                self.block_manager.release_unused(seq)
            self.block_manager.commit_computed_blocks(seq)
        if not step.seqs:
            return []
        now = time.time()
        touched: dict[str, Request] = {}
        for seq, tokens, logprobs in zip(step.seqs, step.token_ids, step.logprobs, strict=True):
            for token, logprob in zip(tokens, logprobs, strict=True):
                seq.token_ids.append(token)
                if logprob is not None:
                    seq.new_logprobs.append(TokenLogprob(token_id=token, logprob=logprob[0], top=logprob[1]))
                self.generation_tokens_total += 1
                self._check_finished(seq, token)
                if seq.is_finished:  # tokens accepted past a stop are dropped
                    break
            request = seq.request
            if seq.index == 0 and request.held_back:
                for sibling in reversed(request.held_back):
                    self.scheduler.add(sibling, front=True)
                request.held_back = []
            touched[request.request_id] = request
        self.draft_tokens_total += step.num_draft_tokens
        self.accepted_tokens_total += step.num_accepted_tokens
        outputs = []
        for request in touched.values():
            timings = request.timings
            timings.first_token = timings.first_token or now
            timings.token_times.append(now)
            if request.is_finished:
                timings.finished = now
                del self.requests[request.request_id]
            outputs.append(self._request_output(request))
        return outputs

    def _check_finished(self, seq: Sequence, token: int) -> None:
        params = seq.params
        if (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
            seq.finish_reason, seq.stop_token_id = "stop", token
        elif seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = "length"
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)

    def _abort_now(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.finish_reason = "abort"
        request.held_back = []
        request.timings.finished = time.time()
        self._abort_outputs.append(self._request_output(request))

    def _request_output(self, request: Request) -> RequestOutput:
        completions = []
        for seq in request.seqs:
            # Only the tokens since the last output are copied each step; the whole list once, at the end.
            new = seq.token_ids[seq.num_prompt_tokens + seq.num_returned_tokens:]
            seq.num_returned_tokens += len(new)
            logprobs = None
            if seq.params.logprobs is not None:
                logprobs, seq.new_logprobs = seq.new_logprobs, []
            completions.append(CompletionOutput(index=seq.index,
                                                token_ids=seq.output_token_ids if seq.finish_reason else [],
                                                new_token_ids=new, logprobs=logprobs,
                                                finish_reason=seq.finish_reason, stop_token_id=seq.stop_token_id))
        return RequestOutput(request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                             outputs=completions, finished=request.is_finished,
                             num_cached_tokens=request.num_cached_tokens, timings=request.timings)

    def _compile_cpu_kernels(self, loaded: LoadedModel) -> None:
        """Prefill-sized steps get the compiled elementwise kernels, compiled now so no request waits for them."""
        modules = [m for m in loaded.model.modules() if isinstance(m, RMSNorm | RotaryEmbedding | SiluAndMul)]
        table = next(m.cos_sin_cache for m in modules if isinstance(m, RotaryEmbedding))
        config = loaded.config
        try:
            seconds = cpu_compiled.warm_up(config.hidden_size, config.intermediate_size, config.num_heads,
                                           config.num_kv_heads, config.head_dim, config.rms_norm_eps, table,
                                           self.dtype)
        except Exception as exc:  # inductor cannot build here (e.g. no C++ compiler): the eager references serve
            log.warning("CPU kernels not compiled, prefill stays eager: %s: %s", type(exc).__name__, exc)
            return
        for module in modules:
            module.compiled_cpu = True
        log.info("RMSNorm, rotary and SiLU-and-mul compiled for prefill-sized CPU steps (%.1fs)", seconds)

    def _use_cpu_elementwise_kernel(self, loaded: LoadedModel) -> None:
        """Steps the compiled kernels do not take run the C elementwise kernel where the engine runs on CPU."""
        if self.device.type != "cpu" or use_triton_on(self.device):
            return
        kernel = elementwise_cpu.resolve_cpu_elementwise(self.config.cpu_elementwise)
        if kernel is None:
            return
        if not kernel.supports(self.dtype, loaded.config.hidden_size, loaded.config.head_dim):
            log.warning("the CPU elementwise kernel does not take %s with hidden size %d, head size %d; those ops "
                        "stay eager", self.dtype, loaded.config.hidden_size, loaded.config.head_dim)
            return
        modules = [m for m in loaded.model.modules() if isinstance(m, RMSNorm | RotaryEmbedding | SiluAndMul)]
        config = loaded.config
        table = next(m.cos_sin_cache for m in modules if isinstance(m, RotaryEmbedding))
        differs = kernel.differs_from_references(self.dtype, config.hidden_size, config.intermediate_size,
                                                 config.num_heads, config.num_kv_heads, config.head_dim, table)
        if differs is not None:
            log.warning("the CPU elementwise kernel's %s is not bit for bit torch's on this CPU and torch build; "
                        "those ops stay eager", differs)
            return
        for module in modules:
            module.cpu_kernel = kernel
        log.info("CPU steps under %d tokens: RMSNorm, rotary and SiLU-and-mul in C (kernels/elementwise_cpu)",
                 cpu_compiled.MIN_ROWS)

    def _use_cpu_matmul_kernel(self, loaded: LoadedModel) -> None:
        """Packed linears run steps of up to 32 tokens in the C kernel (AMX or AVX512-BF16), each weight checked
        against oneDNN first."""
        packed = [m for m in loaded.model.modules() if isinstance(m, PackedLinear)]
        if not packed or use_triton_on(self.device):
            return
        kernel = matmul_cpu.resolve_cpu_matmul(self.config.cpu_matmul)
        if kernel is None:
            return
        taken = [m for m in packed if kernel.supports(m.in_features, m.out_features)]
        if len(taken) < len(packed):
            log.warning("the CPU matmul kernel (%s) takes input feature counts in multiples of %d (on AMX output "
                        "counts too): %d of %d linear layers stay on oneDNN", kernel.layout, matmul_cpu.BLOCK,
                        len(packed) - len(taken), len(packed))
        differing = [m for m in taken if kernel.differs_from_onednn(m.packed_weight, m.bias, m.in_features,
                                                                    m.out_features)]
        if differing:
            log.warning("the CPU matmul kernel (%s) is not bit for bit oneDNN's on %d of %d linear layers (oneDNN "
                        "packed them in another layout, or sums in another order?); all stay on oneDNN",
                        kernel.layout, len(differing), len(taken))
            return
        for module in taken:
            module.cpu_kernel = kernel
        log.info("CPU steps of up to %d tokens: %d linear layers in the %s kernel (kernels/matmul_cpu)",
                 matmul_cpu.MAX_ROWS, len(taken), kernel.layout)

    def _cpu_attention_kernel(self, model: ModelConfig) -> paged_attention_cpu.DecodeKernel | None:
        """The C decode attention kernel where the engine runs on CPU and the kernel takes its dtypes and shapes."""
        if self.device.type != "cpu" or use_triton_on(self.device):
            return None
        kernel = paged_attention_cpu.resolve_cpu_attention(self.config.cpu_attention)
        if kernel is None:
            return None
        if not kernel.supports(self.dtype, self.kv_dtype, model.num_heads, model.num_kv_heads, model.head_dim):
            log.warning("the CPU paged-attention kernel does not take %s / %s cache with %d/%d heads of %d; decode "
                        "attention stays on the torch path", self.dtype, self.kv_dtype, model.num_heads,
                        model.num_kv_heads, model.head_dim)
            return None
        log.info("CPU decode attention: C kernel over the paged cache (kernels/paged_attention_cpu)")
        return kernel

    def _cpu_prefill_kernel(self, kernel: paged_attention_cpu.DecodeKernel | None,
                            model: ModelConfig) -> paged_attention_cpu.PrefillKernel | None:
        """The C prefill attention kernel beside the decode kernel, where it was built (AVX512-BF16) and takes the
        engine's dtypes (bf16 model and cache) and head size; elsewhere prefills attend with torch's SDPA."""
        prefill = kernel.prefill if kernel is not None else None
        if prefill is None or not prefill.supports(self.dtype, self.kv_dtype, model.num_heads, model.num_kv_heads,
                                                   model.head_dim):
            return None
        log.info("CPU prefill attention: C kernel over the paged cache, bf16 (kernels/paged_attention_cpu)")
        return prefill

    def _max_model_len(self, loaded: LoadedModel) -> int:
        limit = loaded.config.max_position_embeddings
        wanted = self.config.max_model_len
        window = loaded.config.sliding_window
        # Attention here spans the whole context; within a sliding window's length the two are the same.
        if window is not None and window < (wanted or limit):
            if wanted is not None:
                raise ValueError(f"max_model_len {wanted} is longer than the model's sliding attention window of "
                                 f"{window} tokens, which this engine does not implement; set it to {window} or less")
            log.warning("the model attends over a sliding window of %d tokens, which this engine does not implement: "
                        "serving a context of %d tokens, where full attention is the same", window, window)
            return window
        if wanted is None:
            return limit
        if not 0 < wanted <= limit:
            raise ValueError(f"max_model_len {wanted} must be between 1 and the model's {limit} positions")
        return wanted

    def _fit_context_to_pool(self, num_blocks: int) -> int:
        """The context length the KV pool can hold for one sequence: a longer one would admit requests (and a
        server's default max_tokens, "the rest of the context") that could never run."""
        capacity = num_blocks * self.block_size
        if self.max_model_len <= capacity:
            return self.max_model_len
        log.warning("max_model_len %d is more than the KV cache holds (%d blocks of %d tokens); serving a context of "
                    "%d tokens (a bigger KV cache allows more)", self.max_model_len, num_blocks, self.block_size,
                    capacity)
        return capacity

    def _check_fp8_support(self) -> None:
        fp8 = [name for name, used in (("LLM_QUANTIZATION=fp8", self.config.quantization == "fp8"),
                                       ("LLM_KV_CACHE_DTYPE=fp8", self.kv_dtype == FP8_KV_DTYPE)) if used]
        if fp8 and not self.hardware.supports_fp8:
            capability = ".".join(map(str, self.hardware.compute_capability or ()))
            raise ValueError(f"{' and '.join(fp8)} need a GPU of compute capability 8.9 or newer (L40S, L4, H100); "
                             f"{self.hardware.name} is {capability}. Use LLM_QUANTIZATION=int8 and "
                             "LLM_KV_CACHE_DTYPE=auto there")

    def _num_kv_blocks(self, loaded: LoadedModel) -> int:
        per_block = kv_bytes_per_block(loaded.config, self.block_size, self.kv_dtype)
        if self.config.num_kv_blocks is not None:
            budget = self.config.num_kv_blocks * per_block
        elif self.device.type == "cuda":
            budget = self._gpu_kv_budget(loaded)
        else:
            budget = int(self.config.kv_cache_gib * 2 ** 30)
        self.kv_budget_bytes = budget
        num_blocks = budget // per_block
        if num_blocks < 2:
            raise ValueError(f"the KV cache budget ({budget / 2**20:.1f} MiB) holds {num_blocks} blocks of "
                             f"{per_block} bytes; at least 2 are needed")
        return num_blocks

    def _gpu_kv_budget(self, loaded: LoadedModel) -> int:
        """Device memory for the KV pool: what the memory share leaves after the weights and the largest step,
        within what is free on the card (see `gpu_memory`)."""
        from services.llm.engine.runner import warm_up_peak_bytes

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        peak, held = warm_up_peak_bytes(loaded.model, loaded.config, self.device, self.dtype, self.block_size,
                                        min(self.max_model_len, self.config.max_num_batched_tokens),
                                        self.config.max_num_seqs, self.kv_dtype)
        before = self._device_memory_before  # held by others in this process: in `free`, not in the share
        peak, held = max(0, peak - before), max(0, held - before)
        free, total = torch.cuda.mem_get_info(self.device)
        budget = plan_kv_budget(total, free, self.config.gpu_memory_utilization, peak, held)
        log.info("KV cache budget %.2f GiB (limited by the %s; GPU %.1f GiB, %.1f GiB free, share %.2f)",
                 budget.bytes / 2**30, budget.limited_by, total / 2**30, free / 2**30,
                 self.config.gpu_memory_utilization)
        return budget.bytes
