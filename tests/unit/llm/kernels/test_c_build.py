"""common/c_build: the C kernels' build cache, and each kernel's auto/kernel/torch choice when nothing builds."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from types import ModuleType

import pytest

from common import c_build
from services.llm.kernels import elementwise_cpu, paged_attention_cpu


def test_build_is_cached_by_source_and_flags(tmp_path: Path) -> None:
    source, flags = paged_attention_cpu.SOURCE, paged_attention_cpu.FLAGS
    first = c_build.build(source, flags, directory=tmp_path)
    assert c_build.build(source, flags, directory=tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial files left behind


def test_a_changed_header_builds_anew(tmp_path: Path) -> None:
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    source = kernels / "kernel.c"
    source.write_text('#include "value.h"\nint value(void) { return VALUE; }\n')
    (kernels / "value.h").write_text("#define VALUE 1\n")
    first = c_build.build(source, c_build.FLAGS, directory=tmp_path / "cache")
    (kernels / "value.h").write_text("#define VALUE 2\n")
    second = c_build.build(source, c_build.FLAGS, directory=tmp_path / "cache")
    assert second != first
    assert ctypes.CDLL(str(first)).value() == 1 and ctypes.CDLL(str(second)).value() == 2


@pytest.mark.parametrize(("module", "resolve", "warning"), [
    (paged_attention_cpu, "resolve_cpu_attention", "stays on the torch path"),
    (elementwise_cpu, "resolve_cpu_elementwise", "stay on the eager references"),
])
def test_missing_compiler_falls_back_to_torch_with_a_warning(module: ModuleType, resolve: str, warning: str,
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    choose = getattr(module, resolve)
    module.shared_kernel.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            assert choose("auto") is None
        assert [r.message for r in caplog.records if warning in r.message]
        with pytest.raises(c_build.KernelBuildError):
            choose("kernel")
        assert choose("torch") is None
    finally:
        module.shared_kernel.cache_clear()
