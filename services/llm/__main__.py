"""`python -m services.llm`: the OpenAI-compatible LLM server (settings from `LLM_*` env vars; `--help` lists them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.service import run_service
from services.llm.settings import LLMSettings


def _build_app() -> Callable[..., Any]:
    """The service's build_app, imported only after --help (torch and friends are slow to import)."""
    from services.llm.app import build_app

    return build_app


def main() -> None:
    run_service(LLMSettings, "OpenAI-compatible LLM server over the built-in inference engine.", _build_app)


if __name__ == "__main__":
    main()
