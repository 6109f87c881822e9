"""The C prefill attention kernel (bf16, AVX512-BF16) against an oracle that rounds where the kernel rounds, and
through the CPU attention plan."""

from __future__ import annotations

import pytest
import torch

from services.llm.kernels import paged_attention_cpu
from services.llm.kernels.attention import paged_attention_reference
from services.llm.kernels.attention_cpu import cpu_paged_attention, plan_cpu_attention
from services.llm.kernels.paged_attention_cpu import KernelPrefills, PrefillKernel
from tests.unit.llm.kernels.paged_cache import build_paged_cache, outputs_at_thread_counts

BLOCK = 16
# (new tokens, all tokens): whole prompts (short, one tile of 48 rows, across tiles and key groups) and chunks
# after a cached prefix (a block boundary, one past it, a long history under a short chunk).
Q_LENS = [9, 16, 17, 100, 40, 20, 130]
SEQ_LENS = [9, 16, 17, 100, 56, 37, 300]


@pytest.fixture(scope="module")
def prefill(tmp_path_factory: pytest.TempPathFactory) -> PrefillKernel:
    kernel = paged_attention_cpu.load(directory=tmp_path_factory.mktemp("kernels")).prefill
    if kernel is None:
        pytest.skip("the prefill kernel needs AVX512-BF16, which this CPU (or its compiler) lacks")
    return kernel


def prefill_inputs(num_heads: int, num_kv_heads: int, head_dim: int, seed: int = 0,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, KernelPrefills]:
    k_cache, v_cache, tables = build_paged_cache(SEQ_LENS, num_kv_heads, head_dim, BLOCK, dtype=torch.bfloat16,
                                                 seed=seed)
    # The queries sit in a wider buffer, as the model's do (a view of the fused q/k/v projection's rows).
    fused = torch.randn(sum(Q_LENS), num_heads + 2 * num_kv_heads, head_dim,
                        generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    starts = torch.tensor([0, *Q_LENS]).cumsum(0)[:-1]
    prefills = KernelPrefills(q_starts=starts, q_lens=torch.tensor(Q_LENS, dtype=torch.int32),
                              seq_lens=torch.tensor(SEQ_LENS, dtype=torch.int32),
                              block_tables=tables.clamp(min=0).contiguous())
    return fused[:, :num_heads], k_cache, v_cache, tables, prefills


def sequence_kv(cache: torch.Tensor, tables: torch.Tensor, b: int, seq_len: int) -> torch.Tensor:
    """Sequence b's first seq_len tokens of a paged cache, `[L, Hkv, D]`, read through its block table."""
    slots = tables[b, torch.arange(seq_len) // BLOCK].long() * BLOCK + torch.arange(seq_len) % BLOCK
    return cache.view(-1, *cache.shape[2:])[slots]


def causal_mask(q_len: int, seq_len: int) -> torch.Tensor:
    """`[q_len, seq_len]` bool: the last q_len tokens each see themselves and everything before."""
    return torch.arange(seq_len)[None, :] <= torch.arange(seq_len - q_len, seq_len)[:, None]


def rounded_weights_oracle(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Causal attention in float64, but with each softmax weight rounded to bf16 before p·v (the sum stays exact),
    as the kernel and torch's CPU flash attention do; the output is left unrounded."""
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    row = 0
    for b, (q_len, seq_len) in enumerate(zip(Q_LENS, SEQ_LENS, strict=True)):
        keys = sequence_kv(k_cache, tables, b, seq_len).double().repeat_interleave(group, 1)  # [L, Hq, D]
        values = sequence_kv(v_cache, tables, b, seq_len).double().repeat_interleave(group, 1)
        queries = q[row:row + q_len].double()  # [q_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
        scores.masked_fill_(~causal_mask(q_len, seq_len)[None], float("-inf"))
        weights = (scores - scores.amax(-1, keepdim=True)).exp()
        out[row:row + q_len] = (torch.einsum("hqk,khd->qhd", weights.to(torch.bfloat16).double(), values)
                                / weights.sum(-1).transpose(0, 1)[..., None])
        row += q_len
    return out


def run(prefill: PrefillKernel, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
        prefills: KernelPrefills, scale: float) -> torch.Tensor:
    out = torch.full(q.shape, float("nan"), dtype=torch.bfloat16)
    prefill(q, k_cache, v_cache, prefills, scale, out)
    return out


# Query heads per KV head 1, 3, 4 and 16; head sizes with 4, 3, 2 and 1 rows per p·v register block.
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"),
                         [(4, 4, 64), (9, 3, 64), (8, 2, 128), (16, 1, 64), (6, 2, 96), (4, 2, 256), (4, 1, 32),
                          (4, 2, 16), (2, 1, 80)])
def test_matches_the_oracle_rounded_where_the_kernel_rounds(prefill: PrefillKernel, num_heads: int,
                                                            num_kv_heads: int, head_dim: int) -> None:
    q, k_cache, v_cache, tables, prefills = prefill_inputs(num_heads, num_kv_heads, head_dim, seed=head_dim)
    got = run(prefill, q, k_cache, v_cache, prefills, head_dim ** -0.5).double()
    want = rounded_weights_oracle(q, k_cache, v_cache, tables, head_dim ** -0.5)
    # fp32 sums of exact products, then one rounding to bf16: half a bf16 step (2^-8 relative) plus fp32's error
    # (the weights themselves may land a bf16 step apart where an fp32 exponent sits on a rounding boundary).
    assert ((got - want).abs() <= want.abs() * 2.0**-8 + 2e-3).all()


def test_any_number_of_threads_gives_the_same_bits(prefill: PrefillKernel) -> None:
    """Each (sequence, KV head) tile is one thread's whole job, so how they are shared out changes nothing."""
    q, k_cache, v_cache, _, prefills = prefill_inputs(9, 3, 64)
    outputs = outputs_at_thread_counts(lambda: run(prefill, q, k_cache, v_cache, prefills, 0.125))
    assert not outputs[0].isnan().any()
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_is_as_close_to_exact_attention_as_torch_sdpa(prefill: PrefillKernel) -> None:
    """Against plain float64 attention, the kernel's error is SDPA's (both round the weights to bf16)."""
    q, k_cache, v_cache, tables, prefills = prefill_inputs(9, 3, 64, seed=7)
    got = run(prefill, q, k_cache, v_cache, prefills, 0.125).double()
    cu = torch.tensor([0, *Q_LENS]).cumsum(0).to(torch.int32)
    exact = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), tables.clamp(min=0), cu,
                                      torch.tensor(SEQ_LENS, dtype=torch.int32), 0.125)
    sdpa = torch.empty_like(q)
    for b, (q_len, seq_len) in enumerate(zip(Q_LENS, SEQ_LENS, strict=True)):
        keys, values = (sequence_kv(cache, tables, b, seq_len).transpose(0, 1)[None] for cache in (k_cache, v_cache))
        rows = slice(int(cu[b]), int(cu[b + 1]))
        result = torch.nn.functional.scaled_dot_product_attention(q[rows].transpose(0, 1)[None], keys, values,
                                                                  attn_mask=causal_mask(q_len, seq_len), scale=0.125,
                                                                  enable_gqa=True)
        sdpa[rows] = result[0].transpose(0, 1)
    kernel_error, sdpa_error = (got - exact).abs(), (sdpa.double() - exact).abs()
    assert kernel_error.max() <= 1.25 * sdpa_error.max()
    assert kernel_error.mean() <= 1.1 * sdpa_error.mean()


def test_plan_runs_prefills_in_the_prefill_kernel_and_decodes_in_the_decode_kernel(prefill: PrefillKernel) -> None:
    # Decodes and a 3-token extension (the decode kernel), a whole prompt and a 12-token chunk (the prefill kernel).
    decode = paged_attention_cpu.load()
    q_lens, seq_lens = [1, 9, 1, 3, 1, 12], [40, 9, 17, 20, 1, 50]
    num_heads, num_kv_heads, head_dim = 6, 2, 64
    k_cache, v_cache, tables = build_paged_cache(seq_lens, num_kv_heads, head_dim, BLOCK, dtype=torch.bfloat16,
                                                 seed=5)
    slots = torch.tensor([int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK
                          for b, (n, length) in enumerate(zip(q_lens, seq_lens, strict=True))
                          for p in range(length - n, length)])
    flat = (-1, num_kv_heads, head_dim)
    k_new, v_new = k_cache.view(flat)[slots].clone(), v_cache.view(flat)[slots].clone()
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    want = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), tables.clamp(min=0), cu,
                                     torch.tensor(seq_lens, dtype=torch.int32), 0.3)
    k_cache.view(flat)[slots] = 0  # the step's keys and values are stored before the kernels read them
    v_cache.view(flat)[slots] = 0
    plan = plan_cpu_attention(q_lens, seq_lens, tables, slots, BLOCK, 2 * num_kv_heads * head_dim * 2, decode,
                              prefill)
    assert plan.prefills == [] and plan.kernel_decodes.rows.tolist() == [0, 10, 11, 12, 13, 14]
    assert plan.kernel_prefills.q_starts.tolist() == [1, 15]
    assert plan.kernel_prefills.q_lens.tolist() == [9, 12] and plan.kernel_prefills.seq_lens.tolist() == [9, 50]
    got = cpu_paged_attention(q, k_new, v_new, k_cache, v_cache, plan, 0.3)
    assert ((got.double() - want).abs() <= want.abs() * 2.0**-7 + 1e-2).all()


def test_takes_only_bf16_and_is_not_built_without_avx512(tmp_path: pytest.TempPathFactory,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert PrefillKernel.supports(torch.bfloat16, torch.bfloat16, 9, 3, 64)
    assert not PrefillKernel.supports(torch.float32, torch.float32, 9, 3, 64)
    assert not PrefillKernel.supports(torch.bfloat16, torch.float8_e4m3fn, 9, 3, 64)
    assert not PrefillKernel.supports(torch.bfloat16, torch.bfloat16, 9, 3, 72)  # head size not a multiple of 16
    monkeypatch.setattr(paged_attention_cpu, "FLAGS", (*paged_attention_cpu.FLAGS, "-mno-avx512f"))
    assert paged_attention_cpu.load(directory=tmp_path).prefill is None


def test_a_bf16_engine_runs_its_prefills_in_the_kernel(prefill: PrefillKernel, tiny_models, make_engine) -> None:
    assert make_engine(tiny_models["llama"], dtype="bfloat16").runner.prefill_kernel is not None
    assert make_engine(tiny_models["llama"], dtype="float32").runner.prefill_kernel is None
    assert make_engine(tiny_models["llama"], dtype="bfloat16", cpu_attention="torch").runner.prefill_kernel is None
