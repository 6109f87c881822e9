"""`python -m services.retriever`: the RAG server (settings from `RETRIEVER_*` env vars; `--help` lists them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from common.service import run_service
from services.retriever.settings import RetrieverSettings


def _build_app() -> Callable[..., Any]:
    """The service's build_app, imported only after --help (torch and friends are slow to import)."""
    from services.retriever.app import build_app

    return build_app


def main() -> None:
    run_service(RetrieverSettings, "RAG retriever: ingestion, hybrid search, answers with citations.", _build_app)


if __name__ == "__main__":
    main()
