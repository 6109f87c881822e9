"""`python -m services.rerank`: the reranking server (settings from `RERANK_*` env vars; `--help` lists them)."""

from __future__ import annotations

from common.service import configure_logging, serve
from common.settings import settings_help
from services.rerank.app import build_app
from services.rerank.settings import RerankSettings


def main() -> None:
    settings_help(RerankSettings, "Reranking server: NIM /v1/ranking and Cohere-style /v1/rerank.").parse_args()
    settings = RerankSettings()
    configure_logging(settings.log_level)
    serve(build_app(settings), settings)


if __name__ == "__main__":
    main()
