"""Settings shared by every service; each service subclasses with its own env prefix.

`API_KEY` is read without a prefix: one key guards the whole stack.
"""

from __future__ import annotations

import argparse
from typing import ClassVar

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, description="TCP port")
    model: str = Field("", description="model directory, .gguf file or hub id (empty: the bundled default)")
    api_key: str | None = Field(
        None,
        validation_alias=AliasChoices("API_KEY"),
        description="when set, every route but health needs 'Authorization: Bearer <key>' (env API_KEY, no prefix)",
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, description="largest request body accepted (413 above)")
    log_level: str = Field("info", description="logging level")
    gpu_memory_utilization: float = Field(1.0, gt=0, le=1, description="most of each GPU's memory this service "
                                          "may use, when it shares the card with others (compose sets it)")

    # Whether `run_service` caps torch's allocator at gpu_memory_utilization; a service that sizes its own
    # memory pools to that share (the llm's KV cache) turns it off.
    caps_gpu_allocator: ClassVar[bool] = True


def settings_help(settings_cls: type[ServiceSettings], description: str) -> argparse.ArgumentParser:
    """An argparse parser whose --help lists every env var the service reads, with defaults."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    lines = []
    for name, field in settings_cls.model_fields.items():
        env = "API_KEY" if name == "api_key" else f"{prefix}{name}".upper()
        default = field.default if field.default not in (None, "") else "-"
        lines.append(f"  {env:<34} {field.description or ''} [default: {default}]")
    epilog = "environment variables:\n" + "\n".join(lines)
    return argparse.ArgumentParser(description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
