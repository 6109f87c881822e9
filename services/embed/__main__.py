"""`python -m services.embed`: the embedding server (settings from EMBED_* env vars; see --help)."""

from __future__ import annotations

from common.settings import settings_help
from services.embed.settings import EmbedSettings


def main() -> None:
    settings_help(EmbedSettings, "OpenAI/NIM-compatible embedding server (POST /v1/embeddings)").parse_args()
    # Imported after --help so that listing the settings does not wait for torch to import.
    from common.service import configure_logging, serve
    from services.embed.app import build_app

    settings = EmbedSettings()
    configure_logging(settings.log_level)
    serve(build_app(settings), settings)


if __name__ == "__main__":
    main()
