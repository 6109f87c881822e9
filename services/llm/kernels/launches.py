"""Every Triton launch of the engine goes through `launch`, so the launches can be listed.

`record()` collects, for each launch, the kernel and what decides its compiled code: each tensor's dtype and
16-byte alignment, the integer and float arguments (Triton specializes integers on the value 1 and on
divisibility by 16), the compile-time constants and the launch options. `bench/kernels_compile.py` compiles
what was recorded ahead of time for real GPUs. `record(dry=True)` also skips the launches, so the launches of a
production-sized model can be listed on the `meta` device, without a GPU or its memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Launch:
    kernel: str  # "module:function" of the @triton.jit function
    args: tuple[Any, ...]  # positional arguments: ("tensor", dtype name, aligned) for tensors, else the value
    kwargs: tuple[tuple[str, Any], ...]  # compile-time constants and launch options (num_warps, num_stages)

    def to_json(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "args": [list(a) if isinstance(a, tuple) else a for a in self.args],
                "kwargs": dict(self.kwargs)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Launch:
        return cls(kernel=data["kernel"], args=tuple(tuple(a) if isinstance(a, list) else a for a in data["args"]),
                   kwargs=tuple(sorted(data["kwargs"].items())))


_recorded: list[Launch] | None = None
_dry = False


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).removeprefix("torch."), value.data_ptr() % 16 == 0)
    return value


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)`, noted down while a `record()` block is open."""
    if _recorded is not None:
        name = f"{kernel.fn.__module__}:{kernel.fn.__qualname__}"
        _recorded.append(Launch(name, tuple(_describe(a) for a in args), tuple(sorted(kwargs.items()))))
        if _dry:
            return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def record(dry: bool = False) -> Iterator[list[Launch]]:
    """Collects the launches made inside the block (in order, repeats included); `dry` skips running them."""
    global _recorded, _dry
    previous = _recorded, _dry
    _recorded, _dry = [], dry
    try:
        yield _recorded
    finally:
        _recorded, _dry = previous
