"""`python -m services.retriever`: the RAG server on RETRIEVER_PORT (8080)."""

from __future__ import annotations

import logging

from common.service import configure_logging, serve
from common.settings import settings_help
from services.retriever.app import build_app
from services.retriever.settings import RetrieverSettings


def main() -> None:
    settings_help(RetrieverSettings, "RAG retriever: ingestion, vector and BM25 search, answers with citations.") \
        .parse_args()
    settings = RetrieverSettings()
    configure_logging(settings.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per dependency call drowns what matters
    serve(build_app(settings), settings)


if __name__ == "__main__":
    main()
