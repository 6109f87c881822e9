#!/usr/bin/env bash
# Builds the wheelhouse bench/gpu_check.sh installs from on the GPU machine, which has no network.
#
#   bench/gpu_wheelhouse.sh [DIR]      # default: .whl (git-ignored; carry it to the GPU machine with the tree)
#
# The GPU machine (see the developers' guide: Python 3.12, torch 2.11, triton 3.6, transformers 5.17) lacks what
# the llm server needs on top of torch: fastapi, uvicorn, pydantic-settings, python-multipart (and pydantic,
# which its image does not list; fastapi brings opentelemetry-api). This downloads those, at this repository's
# pins, with their dependencies, as wheels for CPython 3.12 on manylinux x86_64 (pydantic-core is the one
# compiled wheel), a few MB in all. It adds gguf (pure Python) without its dependencies (numpy, pyyaml,
# requests, tqdm: all on that machine), for the GGUF tests and loader. gpu_check.sh installs only what the
# machine is missing, with `pip install --no-index --find-links DIR`.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-$ROOT/.whl}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

# The pins of pyproject.toml, so the GPU machine serves with the versions the tests ran here.
pin() { grep -oE "\"$1==[^\"]+\"" "$ROOT/pyproject.toml" | tr -d '"'; }
PACKAGES=("$(pin fastapi)" "$(pin uvicorn)" "$(pin pydantic)" "$(pin pydantic-settings)" "$(pin python-multipart)")

mkdir -p "$DIR"
echo "downloading ${PACKAGES[*]} and their dependencies for cp312 manylinux x86_64 into $DIR"
"$PY" -m pip download --quiet --dest "$DIR" --only-binary=:all: --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${PACKAGES[@]}"
"$PY" -m pip download --quiet --dest "$DIR" --no-deps --only-binary=:all: "$(pin gguf)"
ls -1 "$DIR"
du -sh "$DIR"
