"""`python -m services.embed`: the embedding server (settings from `EMBED_*` env vars; `--help` lists them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.service import run_service
from services.embed.settings import EmbedSettings


def _build_app() -> Callable[..., Any]:
    """The service's build_app, imported only after --help (torch and friends are slow to import)."""
    from services.embed.app import build_app

    return build_app


def main() -> None:
    run_service(EmbedSettings, "OpenAI/NIM-compatible embedding server (POST /v1/embeddings)", _build_app)


if __name__ == "__main__":
    main()
