"""The roofline ranks configurations the obvious way."""

import pytest

from scripts.sizing.devices import load_device
from scripts.sizing.roofline import Efficiency, Roofline, Workload
from scripts.sizing.shapes import load_shape

EFF = Efficiency()
CHAT = Workload.fixed(128, 512)


def model(name: str = "llama-3-8b", device: str = "h100-sxm", precision: str = "bf16") -> Roofline:
    return Roofline(load_shape(name), load_device(device), precision, "fp8" if precision == "fp8" else "bf16")


def test_more_bandwidth_means_faster_decode() -> None:
    a100, h100, h200 = (model(device=d).serve(1, 8, CHAT, EFF) for d in ("a100-80g", "h100-sxm", "h200"))
    assert a100.itl_s > h100.itl_s > h200.itl_s
    assert a100.rps < h100.rps < h200.rps


def test_more_flops_means_faster_prefill() -> None:
    long_prompt = Workload.fixed(4096, 16)
    assert model(device="a100-80g").serve(1, 1, long_prompt, EFF).ttft_s > \
        model(device="h100-sxm").serve(1, 1, long_prompt, EFF).ttft_s


def test_fp8_beats_bf16_and_a_bigger_model_is_slower() -> None:
    assert model(precision="fp8").serve(1, 8, CHAT, EFF).itl_s < model().serve(1, 8, CHAT, EFF).itl_s
    assert model("llama-3-70b", "h200").serve(2, 8, CHAT, EFF).itl_s > model("llama-3-8b", "h200").serve(
        2, 8, CHAT, EFF).itl_s


def test_larger_batches_trade_latency_for_throughput() -> None:
    r = model()
    points = [r.serve(1, b, CHAT, EFF) for b in (1, 2, 4, 8, 16, 32, 64)]
    assert [p.itl_s for p in points] == sorted(p.itl_s for p in points)
    assert [p.ttft_s for p in points] == sorted(p.ttft_s for p in points)
    assert [p.rps for p in points] == sorted(p.rps for p in points)


def test_tensor_parallelism_cuts_latency_of_a_big_model() -> None:
    r = model("llama-3-70b", "h200")
    itls = [r.serve(tp, 1, CHAT, EFF).itl_s for tp in (1, 2, 4, 8)]
    ttfts = [r.serve(tp, 1, Workload.fixed(2048, 64), EFF).ttft_s for tp in (1, 2, 4, 8)]
    assert itls == sorted(itls, reverse=True)
    assert ttfts == sorted(ttfts, reverse=True)


def test_pcie_all_reduce_costs_more_than_nvlink() -> None:
    l40s = model("llama-3-8b", "l40s")
    assert float(l40s.allreduce_s(4, 1)) > float(model().allreduce_s(4, 1)) > 0.0 == float(model().allreduce_s(1, 1))


def test_longer_prompts_wait_longer() -> None:
    r = model()
    ttfts = [r.serve(1, 4, Workload.fixed(n, 128), EFF).ttft_s for n in (128, 512, 2048, 8192)]
    assert ttfts == sorted(ttfts)


def test_memory_bounds_the_batch() -> None:
    r = model("llama-3-70b", "h100-sxm")
    assert r.max_batch(1, CHAT) == 0  # 141 GB of bf16 weights do not fit in 80 GB
    assert 0 < r.max_batch(2, CHAT) < r.max_batch(4, CHAT) < r.max_batch(8, CHAT)
    small = model()
    assert small.max_batch(1, Workload.fixed(4096, 4096)) < small.max_batch(1, CHAT)
    # KV budget = 90% of 80 GB minus 16 GB of weights, over 128 KiB x 640 tokens per request
    expected = (0.9 * 80e9 - small.shape.weight_bytes("bf16")) // (128 * 1024 * 640)
    assert small.max_batch(1, CHAT) == expected


def test_kv_heads_are_replicated_beyond_their_count() -> None:
    r = model("llama-3-8b")  # 8 KV heads
    assert r.kv_per_token_per_device(8) == pytest.approx(r.kv_per_token_per_device(1) / 8)
    smol = model("smollm2-135m")  # 3 KV heads, 9 query heads
    assert smol.kv_per_token_per_device(9) == pytest.approx(smol.kv_per_token_per_device(1) / 3)


def test_littles_law_holds() -> None:
    p = model().serve(2, 32, CHAT, EFF)
    assert p.rps * p.e2e_s == pytest.approx(32)
