"""A service's share of a GPU it shares with others, enforced by torch's caching allocator.

compose.yaml puts all four services on one card and gives each a share (`*_GPU_MEMORY_UTILIZATION`, adding up to
0.95). The llm's engine sizes its KV-cache pool to its own share; every other service caps its allocator here, so
that a burst of large batches fails in that service (an out-of-memory error, logged) instead of starving the llm.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def cap_gpu_memory(fraction: float) -> None:
    """Let this process allocate at most `fraction` of each visible GPU's memory; a no-op at 1.0 or without CUDA."""
    if fraction >= 1.0:
        return
    import torch

    if not torch.cuda.is_available():
        return
    for device in range(torch.cuda.device_count()):
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    log.info("GPU memory capped at %.0f%% of each of %d device(s)", fraction * 100, torch.cuda.device_count())
