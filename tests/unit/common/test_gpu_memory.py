"""Each service's GPU memory share: read from its env var, validated, and enforced where the service doesn't size
its own pools (compose.yaml gives the four services shares of one card that add up to 0.95)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from common.gpu_memory import cap_gpu_memory
from services.embed.settings import EmbedSettings
from services.llm.settings import LLMSettings
from services.rerank.settings import RerankSettings
from services.retriever.settings import RetrieverSettings

CAPPED = {"EMBED": EmbedSettings, "RERANK": RerankSettings, "RETRIEVER": RetrieverSettings}


@pytest.mark.parametrize("prefix", CAPPED)
def test_share_comes_from_the_services_env_var(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_cls = CAPPED[prefix]
    assert settings_cls().gpu_memory_utilization == 1.0  # alone on a card (or on CPU): no cap
    monkeypatch.setenv(f"{prefix}_GPU_MEMORY_UTILIZATION", "0.05")
    assert settings_cls().gpu_memory_utilization == 0.05
    assert settings_cls.caps_gpu_allocator


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_share_outside_zero_to_one_is_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBED_GPU_MEMORY_UTILIZATION", value)
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        EmbedSettings()


def test_llm_sizes_its_own_pool_instead_of_a_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_GPU_MEMORY_UTILIZATION", "0.75")
    assert LLMSettings().gpu_memory_utilization == 0.75
    assert not LLMSettings.caps_gpu_allocator


def test_help_documents_the_share() -> None:
    from common.settings import settings_help

    assert "RERANK_GPU_MEMORY_UTILIZATION" in settings_help(RerankSettings, "rerank").format_help()


@pytest.mark.gpu
def test_capped_process_cannot_allocate_past_its_share() -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    cap_gpu_memory(0.05)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(total * 0.10), dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
