"""CUDA-graph capture and replay of the decode step, padded to a few batch sizes.

A decode step launches hundreds of small kernels; replaying them as one captured graph removes the launch
overhead that dominates small-batch decode. The runner owns static input buffers sized for the largest
batch, captures `step(inputs)` once per batch size in `capture_sizes` (after the KV pool exists, since the
graph bakes in its addresses), and at run time copies the live inputs into the buffers, pads the rest of
the rows with harmless values and replays the smallest graph that fits. Larger batches, or `enabled=False`,
run `step` eagerly on the same inputs.

How the engine's model runner wires it (`engine/runner.py`):

    buffers = decode_graph_buffers(max_bs, max_blocks, device)   # input_ids, positions, slot_mapping, ...
    graphs = DecodeGraphRunner(step_to_hidden_states, buffers, padding={"slot_mapping": -1, "seq_lens": 0})
    graphs.capture()                      # once, after the KV pool is allocated
    hidden = graphs.run(live_inputs)      # every decode step; returns rows for the live batch only

Padding rows use slot -1 (`store_kv` skips them) and length 0 (decode attention returns zeros for them),
so they never touch real cache blocks. The step must not read `seq_lens` values on the host
(`paged_decode_attention` does not), and must return one tensor with the batch as its first dimension.
The tensor `run` returns is a view of the graph's output buffer: consume it (sample) before the next `run`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

DecodeStep = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def default_capture_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to `max_batch_size` (padding waste stays under 16 rows)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if not sizes or sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class DecodeGraphRunner:
    def __init__(self, step: DecodeStep, buffers: dict[str, torch.Tensor],
                 padding: dict[str, int | float] | None = None, capture_sizes: list[int] | None = None,
                 enabled: bool = True) -> None:
        max_batch = min(t.shape[0] for t in buffers.values())
        self.step = step
        self.buffers = buffers
        self.padding = padding or {}
        self.capture_sizes = sorted(capture_sizes or default_capture_sizes(max_batch))
        assert self.capture_sizes[-1] <= max_batch, "buffers must hold the largest captured batch"
        self.enabled = enabled and all(t.is_cuda for t in buffers.values())
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self._pool: object | None = None

    def padded_size(self, batch_size: int) -> int | None:
        """The captured size a batch replays at, or None when it must run eagerly."""
        if not self.enabled:
            return None
        return next((s for s in self.capture_sizes if s >= batch_size), None)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per size, largest first so the smaller ones reuse its memory pool."""
        if not self.enabled:
            return
        for name, fill in self.padding.items():
            self.buffers[name].fill_(fill)
        stream = torch.cuda.Stream()
        for size in reversed(self.capture_sizes):
            inputs = {name: buf[:size] for name, buf in self.buffers.items()}
            # Warm-up on a side stream compiles Triton kernels and settles allocator state before capture.
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self.step(inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self._outputs[size] = self.step(inputs)
            self._pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.capture_sizes)

    def run(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """`step(inputs)`, replayed from a graph when one fits; rows beyond the live batch are dropped."""
        batch = next(iter(inputs.values())).shape[0]
        size = self.padded_size(batch)
        if size is None or size not in self._graphs:
            return self.step(inputs)
        for name, buf in self.buffers.items():
            live = inputs[name]
            if buf.dim() == 2:
                # Block tables may be narrower than the buffer; stale columns past a row's length are never read.
                buf[:batch, : live.shape[1]].copy_(live)
            else:
                buf[:batch].copy_(live)
            if size > batch:
                buf[batch:size].fill_(self.padding.get(name, 0))
        self._graphs[size].replay()
        return self._outputs[size][:batch]
