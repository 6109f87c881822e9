"""The AMX dense attention kernel against an fp32 computation (key ranges, causal, grouped heads, strided views),
the same bits on any thread count, the padding masks it takes from transformers, and its fallbacks."""

from __future__ import annotations

import pytest
import torch

from common import c_build, dense_attention_cpu
from common.cpu import cpu_flags
from common.dense_attention_cpu import DenseAttentionKernel, padding_ranges

pytestmark = pytest.mark.skipif(bool(c_build.AMX_FLAGS - cpu_flags()), reason="this CPU has no AMX bf16")


@pytest.fixture(scope="module")
def kernel() -> DenseAttentionKernel:
    return dense_attention_cpu.load()


def reference(q, k, v, scale, ranges=None, causal=False) -> torch.Tensor:
    """fp32 attention, `[batch, q_len, heads, head_dim]`; a query that sees no key gets zeros."""
    batch, heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    k = k.float().repeat_interleave(heads // kv_heads, 1)
    v = v.float().repeat_interleave(heads // kv_heads, 1)
    scores = q.float() @ k.transpose(-1, -2) * scale
    seen = torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool)
    keys = torch.arange(kv_len)
    if ranges is not None:
        seen &= ((keys >= ranges[:, :1]) & (keys < ranges[:, 1:]))[:, None, None, :]
    if causal:
        seen &= (keys[None, :] <= torch.arange(q_len)[:, None] + kv_len - q_len)[None, None]
    probs = torch.softmax(scores.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    return (probs @ v).transpose(1, 2)


def random_qkv(generator, batch, heads, kv_heads, q_len, kv_len, head_dim):
    q = torch.randn(batch, heads, q_len, head_dim, generator=generator).to(torch.bfloat16)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator).to(torch.bfloat16)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=generator).to(torch.bfloat16)
    return q, k, v


CASES = [  # batch, heads, kv_heads, q_len, kv_len, head_dim, causal, ranges
    (2, 4, 4, 37, 37, 32, False, True),  # an encoder's padded batch, partial query and key blocks
    (3, 12, 12, 254, 254, 32, False, True),  # all-MiniLM-L6-v2's shape
    (1, 9, 3, 50, 70, 64, True, False),  # grouped heads, a causal prompt after a cached prefix
    (2, 8, 2, 17, 17, 128, True, True),
    (1, 2, 1, 5, 300, 96, False, False),  # three head chunks, keys in many blocks
    (2, 3, 3, 1, 33, 256, False, True),  # the largest head size, one query
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}kv{}q{}k{}d{}{}{}".format(
    *c[:6], "-causal" if c[6] else "", "-ranges" if c[7] else ""))
def test_matches_fp32_attention_within_bf16_rounding(kernel: DenseAttentionKernel, case) -> None:
    batch, heads, kv_heads, q_len, kv_len, head_dim, causal, with_ranges = case
    generator = torch.Generator().manual_seed(sum(case[:6]))
    q, k, v = random_qkv(generator, batch, heads, kv_heads, q_len, kv_len, head_dim)
    ranges = None
    if with_ranges:
        ends = torch.randint(1, kv_len + 1, (batch,), generator=generator)
        starts = torch.zeros(batch, dtype=torch.int64) if causal else (torch.rand(batch, generator=generator)
                                                                         * ends).long()
        ranges = torch.stack([starts, ends], -1).contiguous()
    scale = head_dim ** -0.5
    out = kernel(q, k, v, scale, ranges, causal)
    assert out.shape == (batch, q_len, heads, head_dim) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference(q, k, v, scale, ranges, causal), atol=2e-2, rtol=2e-2)


def test_reads_strided_views_as_transformers_passes_them(kernel: DenseAttentionKernel) -> None:
    """transformers hands over `[batch, positions, heads, head_dim]` projections transposed, not copied."""
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 40, 6, 32, generator=generator).to(torch.bfloat16).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    torch.testing.assert_close(kernel(q, k, v, 0.2).float(), reference(q, k, v, 0.2), atol=2e-2, rtol=2e-2)
    assert torch.equal(kernel(q, k, v, 0.2), kernel(q.contiguous(), k.contiguous(), v.contiguous(), 0.2))


def test_any_number_of_threads_gives_the_same_bits(kernel: DenseAttentionKernel) -> None:
    q, k, v = random_qkv(torch.Generator().manual_seed(2), 3, 5, 5, 70, 70, 64)
    ranges = torch.tensor([[0, 70], [3, 41], [60, 61]])
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outputs.append(kernel(q, k, v, 0.125, ranges))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_a_query_that_sees_no_key_gets_zeros(kernel: DenseAttentionKernel) -> None:
    q, k, v = random_qkv(torch.Generator().manual_seed(3), 1, 2, 2, 8, 4, 32)  # causal, more queries than keys
    out = kernel(q, k, v, 0.2, causal=True)
    assert torch.equal(out[0, :4], torch.zeros_like(out[0, :4]))
    torch.testing.assert_close(out.float(), reference(q, k, v, 0.2, causal=True), atol=2e-2, rtol=2e-2)


def test_supports_only_what_it_reads(kernel: DenseAttentionKernel) -> None:
    q, k, v = random_qkv(torch.Generator().manual_seed(4), 1, 4, 2, 3, 3, 32)
    assert kernel.supports(q, k, v)
    assert not kernel.supports(q.float(), k.float(), v.float())
    assert not kernel.supports(q[..., :16], k[..., :16], v[..., :16])  # head size not a multiple of 32
    assert not kernel.supports(q[:, :3], k, v)  # 3 query heads over 2 key/value heads
    assert not kernel.supports(q.transpose(-1, -2), k, v)  # head dims not contiguous


def padding_mask(rows: list[list[bool]], q_len: int) -> torch.Tensor:
    keys = torch.tensor(rows)
    return keys[:, None, None, :].expand(len(rows), 1, q_len, keys.shape[1])


def test_padding_masks_become_key_ranges() -> None:
    right = padding_mask([[True, True, True, False], [True, False, False, False]], 4)
    assert padding_ranges(right, 2, 4).tolist() == [[0, 3], [0, 1]]
    left = padding_mask([[False, True, True, True], [True, True, True, True]], 4)
    assert padding_ranges(left, 2, 4).tolist() == [[1, 4], [0, 4]]
    assert padding_ranges(None, 3, 5).tolist() == [[0, 5]] * 3


def test_other_masks_are_left_to_torch() -> None:
    assert padding_ranges(padding_mask([[True, False, True]], 3), 1, 3) is None  # not one run of keys
    assert padding_ranges(padding_mask([[False, False, False]], 3), 1, 3) is None  # no key at all
    causal = torch.ones(3, 3, dtype=torch.bool).tril()[None, None]
    assert padding_ranges(causal, 1, 3) is None  # queries see different keys
    assert padding_ranges(torch.zeros(1, 1, 1, 3), 1, 3) is None  # an additive float mask


def test_transformers_models_switch_to_it_and_keep_their_outputs(kernel: DenseAttentionKernel, monkeypatch) -> None:
    from transformers import BertConfig, BertModel

    calls = []
    run = DenseAttentionKernel.__call__
    monkeypatch.setattr(DenseAttentionKernel, "__call__", lambda self, *args: calls.append(1) or run(self, *args))

    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = BertModel(config).eval().to(torch.bfloat16)
    ids = torch.randint(1, 100, (3, 20))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, 12:], mask[2, 3:] = 0, 0
    with torch.inference_mode():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        assert dense_attention_cpu.use_in(model) == 1
        assert model.config._attn_implementation == dense_attention_cpu.IMPLEMENTATION
        after = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert len(calls) == 2  # both layers' attention ran on the kernel, none fell back to SDPA
    kept = mask.bool()
    torch.testing.assert_close(after[kept].float(), before[kept].float(), atol=5e-2, rtol=5e-2)


def test_a_build_without_amx_code_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(dense_attention_cpu, "FLAGS", (*dense_attention_cpu.FLAGS, "-mno-amx-tile"))
    with pytest.raises(c_build.KernelBuildError, match="no AMX code"):
        dense_attention_cpu.load(directory=tmp_path)
    assert dense_attention_cpu.resolve_dense_attention("torch") is None
