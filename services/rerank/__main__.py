"""`python -m services.rerank`: the reranking server (settings from `RERANK_*` env vars; `--help` lists them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.service import run_service
from services.rerank.settings import RerankSettings


def _build_app() -> Callable[..., Any]:
    """The service's build_app, imported only after --help (torch and friends are slow to import)."""
    from services.rerank.app import build_app

    return build_app


def main() -> None:
    run_service(RerankSettings, "Reranking server: NIM /v1/ranking and Cohere-style /v1/rerank.", _build_app)


if __name__ == "__main__":
    main()
