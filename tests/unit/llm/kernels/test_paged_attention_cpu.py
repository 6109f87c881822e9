"""The C decode attention kernel against the token-by-token oracle, through the CPU attention plan, and its fallback."""

from __future__ import annotations

import pytest
import torch

from common import c_build
from services.llm.kernels import paged_attention_cpu
from services.llm.kernels.attention import paged_attention_reference
from services.llm.kernels.attention_cpu import cpu_paged_attention, plan_cpu_attention
from services.llm.kernels.kv_store import FP8_KV_DTYPE
from services.llm.kernels.paged_attention_cpu import DecodeKernel, KernelDecodes
from tests.unit.llm.kernels.paged_cache import build_paged_cache, outputs_at_thread_counts

BLOCK = 16
# One token, a block boundary, one past it, and longer rows, unsorted.
LENS = [1, 16, 17, 300, 5, 32, 33, 130]


@pytest.fixture(scope="module", params=["native", "plain C"])
def kernel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DecodeKernel:
    """As built here (AVX512 where the CPU has it), and without AVX512: the plain-C fallback."""
    if request.param == "plain C":
        monkeypatch = pytest.MonkeyPatch()
        monkeypatch.setattr(paged_attention_cpu, "FLAGS", (*paged_attention_cpu.FLAGS, "-mno-avx512f"))
        request.addfinalizer(monkeypatch.undo)
    return paged_attention_cpu.load(directory=tmp_path_factory.mktemp("kernels"))


def decode_inputs(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    k_cache, v_cache, tables = build_paged_cache(LENS, num_kv_heads, head_dim, BLOCK, dtype=dtype, seed=head_dim)
    # The queries sit in a wider buffer, as the model's do (a view of the fused q/k/v projection's rows).
    fused = torch.randn(len(LENS), num_heads + 2 * num_kv_heads, head_dim,
                        generator=torch.Generator().manual_seed(1)).to(dtype)
    return fused[:, :num_heads], k_cache, v_cache, tables


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
              scale: float) -> torch.Tensor:
    """The oracle in float64, on the same (already rounded) inputs."""
    cu = torch.arange(len(LENS) + 1, dtype=torch.int32)
    return paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), tables.clamp(min=0), cu,
                                     torch.tensor(LENS, dtype=torch.int32), scale)


def run_kernel(kernel: DecodeKernel, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               tables: torch.Tensor, scale: float) -> torch.Tensor:
    decodes = KernelDecodes(rows=torch.arange(len(LENS)), block_tables=tables,
                            seq_lens=torch.tensor(LENS, dtype=torch.int32))
    out = torch.full(q.shape, float("nan"), dtype=q.dtype)
    kernel(q, k_cache, v_cache, decodes, scale, out)
    return out


@pytest.mark.parametrize("head_dim", [64, 128])
# Query heads per KV head 1, 3, 4, 8 and 16: the values are summed in 4, 4, 4, 2 and 1 slices of 16 at a time.
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (9, 3), (8, 2), (16, 2), (16, 1)])
def test_fp32_matches_oracle(kernel: DecodeKernel, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    q, k_cache, v_cache, tables = decode_inputs(num_heads, num_kv_heads, head_dim, torch.float32)
    got = run_kernel(kernel, q, k_cache, v_cache, tables, head_dim ** -0.5)
    torch.testing.assert_close(got.double(), reference(q, k_cache, v_cache, tables, head_dim ** -0.5),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (9, 3), (8, 2)])
def test_bf16_is_the_oracle_rounded_once(kernel: DecodeKernel, num_heads: int, num_kv_heads: int,
                                         head_dim: int) -> None:
    q, k_cache, v_cache, tables = decode_inputs(num_heads, num_kv_heads, head_dim, torch.bfloat16)
    got = run_kernel(kernel, q, k_cache, v_cache, tables, head_dim ** -0.5).double()
    want = reference(q, k_cache, v_cache, tables, head_dim ** -0.5)
    # fp32 work, then one rounding to bf16: within half a bf16 step (2^-8 relative) plus fp32's own error.
    assert ((got - want).abs() <= want.abs() * 2.0**-8 + 1e-5).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_any_number_of_threads_gives_the_same_bits(kernel: DecodeKernel, dtype: torch.dtype) -> None:
    """Each (row, KV head) is one thread's whole job, so how they are shared out changes nothing."""
    q, k_cache, v_cache, tables = decode_inputs(9, 3, 64, dtype)
    outputs = outputs_at_thread_counts(lambda: run_kernel(kernel, q, k_cache, v_cache, tables, 0.125))
    assert not outputs[0].isnan().any()
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_shape_specialized_loops_give_the_generic_loops_bits(dtype: torch.dtype,
                                                                 tmp_path_factory: pytest.TempPathFactory) -> None:
    """The kernel inlines its inner loops for common group and head sizes, so that their accumulators stay in
    registers; a build without those cases runs every shape on the generic loops, with the same arithmetic in the
    same order, so it must give the same bits."""
    directory = tmp_path_factory.mktemp("kernels")
    specialized = paged_attention_cpu.load(directory=directory)
    flags = (*paged_attention_cpu.FLAGS, "-DPAGED_ATTENTION_GENERIC")
    generic = DecodeKernel(c_build.build(paged_attention_cpu.SOURCE, flags, directory=directory))
    for num_heads, num_kv_heads, head_dim in [(9, 3, 64), (32, 8, 128), (10, 2, 64), (16, 2, 128), (4, 4, 32),
                                              (6, 2, 256), (8, 1, 96)]:
        q, k_cache, v_cache, tables = decode_inputs(num_heads, num_kv_heads, head_dim, dtype)
        want = run_kernel(generic, q, k_cache, v_cache, tables, 0.125)
        assert torch.equal(run_kernel(specialized, q, k_cache, v_cache, tables, 0.125), want)


def test_fp8_cache_is_widened_exactly(kernel: DecodeKernel) -> None:
    q, k_cache, v_cache, tables = decode_inputs(9, 3, 64, torch.float32)
    k_fp8, v_fp8 = (c.clamp(-448, 448).to(FP8_KV_DTYPE) for c in (k_cache, v_cache))
    every_byte = torch.arange(256, dtype=torch.uint8)
    every_byte = every_byte[(every_byte & 0x7F) != 0x7F]  # all but e4m3's NaNs: normals, subnormals, ±0
    k_fp8.view(torch.uint8).view(-1)[:every_byte.numel()] = every_byte
    got = run_kernel(kernel, q, k_fp8, v_fp8, tables, 0.125)
    want = reference(q, k_fp8.float(), v_fp8.float(), tables, 0.125)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_plan_runs_decodes_and_short_extensions_in_the_kernel(kernel: DecodeKernel) -> None:
    # Decodes and a 3-token extension (the kernel), a whole prompt and a 12-token extension (torch), in one step.
    q_lens, seq_lens = [1, 9, 1, 3, 1, 12], [40, 9, 17, 20, 1, 50]
    num_heads, num_kv_heads, head_dim = 6, 2, 64
    k_cache, v_cache, tables = build_paged_cache(seq_lens, num_kv_heads, head_dim, BLOCK, seed=5)
    slots = torch.tensor([int(tables[b, p // BLOCK]) * BLOCK + p % BLOCK
                          for b, (n, length) in enumerate(zip(q_lens, seq_lens, strict=True))
                          for p in range(length - n, length)])
    flat = (-1, num_kv_heads, head_dim)
    k_new, v_new = k_cache.view(flat)[slots].clone(), v_cache.view(flat)[slots].clone()
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    want = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), tables.clamp(min=0), cu,
                                     torch.tensor(seq_lens, dtype=torch.int32), 0.3)
    k_cache.view(flat)[slots] = 0  # the step's keys and values are stored before the kernel reads them
    v_cache.view(flat)[slots] = 0
    plan = plan_cpu_attention(q_lens, seq_lens, tables, slots, BLOCK, 2 * num_kv_heads * head_dim * 4, kernel)
    assert plan.decodes == [] and plan.kernel_decodes.rows.tolist() == [0, 10, 11, 12, 13, 14]
    assert plan.kernel_decodes.seq_lens.tolist() == [40, 17, 18, 19, 20, 1]  # each query's causal span
    assert [(p.q_start, p.q_len) for p in plan.prefills] == [(1, 9), (15, 12)]
    got = cpu_paged_attention(q, k_new, v_new, k_cache, v_cache, plan, 0.3)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
