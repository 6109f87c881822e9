"""How much GPU memory the KV pool gets.

The engine may use `share` of the card's memory (`LLM_GPU_MEMORY_UTILIZATION`; services sharing one GPU keep
their shares summed at or below 0.95). Once the weights are loaded and a warm-up step has measured the peak of
the largest step (a full prefill chunk, then a full batch of sampling), the KV pool gets what is left of the
share, and never more than what is actually free on the card now (other processes included) less that step's
transient memory. Both keep `OVERHEAD_BYTES` aside for what torch's allocator does not see: the CUDA context,
cuBLAS workspaces, the captured decode graphs. On a small card (24 GB for a 7B model) the pool simply comes
out smaller: fewer tokens fit at once, and the engine serves a context no longer than the pool holds.
Start-up fails only when the weights and the step leave nothing, with the numbers and the setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30
OVERHEAD_BYTES = 768 * 2**20


@dataclass(frozen=True, slots=True)
class KVBudget:
    bytes: int
    limited_by: str  # "share" (LLM_GPU_MEMORY_UTILIZATION) or "free memory" (what other processes left)


def plan_kv_budget(total: int, free: int, share: float, peak: int, held: int) -> KVBudget:
    """`total`/`free`: the card's memory and what is free now; `peak`: the engine's allocated bytes at the
    warm-up step's peak (weights included); `held`: what it still holds after the step (the weights). Both are the
    engine's own: what its process held before it began (another engine) counts against `free` only."""
    transient = max(0, peak - held)
    by_share = int(total * share) - peak - OVERHEAD_BYTES
    by_free = free - transient - OVERHEAD_BYTES
    if by_share <= 0:
        raise ValueError(
            f"LLM_GPU_MEMORY_UTILIZATION={share} gives the engine {total * share / GIB:.1f} GiB of the GPU's "
            f"{total / GIB:.1f} GiB, but the weights and the largest step take {peak / GIB:.1f} GiB, plus "
            f"{OVERHEAD_BYTES / GIB:.2f} GiB for the CUDA context and graphs: nothing is left for the KV cache. "
            "Raise the share, or lower LLM_MAX_NUM_BATCHED_TOKENS / LLM_MAX_NUM_SEQS, or use a smaller model")
    if by_free <= 0:
        raise ValueError(
            f"only {free / GIB:.1f} GiB of the GPU's {total / GIB:.1f} GiB is free (other processes hold the rest) "
            f"and the largest step needs {transient / GIB:.1f} GiB plus {OVERHEAD_BYTES / GIB:.2f} GiB of "
            "overhead: nothing is left for the KV cache. Free the GPU or lower the other services' shares")
    if by_share <= by_free:
        return KVBudget(bytes=by_share, limited_by="share")
    return KVBudget(bytes=by_free, limited_by="free memory")
