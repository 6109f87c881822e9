"""`python -m services.llm`: the OpenAI-compatible LLM server (settings from `LLM_*` env vars)."""

from __future__ import annotations

from common.service import configure_logging, serve
from common.settings import settings_help
from services.llm.app import build_app
from services.llm.settings import LLMSettings


def main() -> None:
    settings_help(LLMSettings, "OpenAI-compatible LLM server over the built-in inference engine.").parse_args()
    settings = LLMSettings()
    configure_logging(settings.log_level)
    serve(build_app(settings), settings)


if __name__ == "__main__":
    main()
