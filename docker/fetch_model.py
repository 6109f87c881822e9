"""Container entrypoint: make sure the models a service names are on disk, then exec the service.

    fetch_model.py VAR [VAR...] -- COMMAND [ARG...]

Each VAR is an env var naming a model (e.g. LLM_MODEL). Empty or an existing path: used as it is (bundled default,
or a directory/.gguf mounted into the volume, which works offline). Anything else is a hub id such as
`BAAI/bge-base-en-v1.5`: downloaded once with huggingface_hub into `$HF_HOME/models/BAAI/bge-base-en-v1.5` (a named
volume), and VAR is rewritten to that directory, so the service only ever loads from disk and names the model after
the folder. A finished download is marked, so later starts (and offline starts) never contact the hub. A model baked
into the image at build time (`--build-arg BAKED_MODEL=org/name`, fetched into `$BAKED_HF_HOME`) is found there
first: it lies outside the volume's mount point, so the volume never hides it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# Weights in formats the services never load; skipping them keeps the first start shorter.
SKIPPED_FILES = ["*.onnx", "onnx/*", "openvino/*", "*.msgpack", "*.h5", "*.ot", "*.tflite", "*.bin", "*.pth", "*.pt"]
COMPLETE_MARKER = ".fetched"

log = logging.getLogger("fetch_model")


def model_root() -> Path:
    """Where hub models are downloaded to: `$HF_HOME/models`, the shared volume in a deployment."""
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "models"


def baked_model(value: str) -> Path | None:
    """The finished copy of hub id `value` baked into the image, if the image has one."""
    baked_home = os.environ.get("BAKED_HF_HOME")
    if not baked_home:
        return None
    folder = Path(baked_home) / "models" / value
    return folder if (folder / COMPLETE_MARKER).exists() else None


def local_model(value: str) -> str:
    """The on-disk location of the model `value` names, downloading a hub id the first time."""
    if not value or Path(value).exists():
        return value
    if (baked := baked_model(value)) is not None:
        return str(baked)
    target = model_root() / value
    if (target / COMPLETE_MARKER).exists():
        return str(target)
    from huggingface_hub import snapshot_download

    log.info("fetching %s into %s (first start only)", value, target)
    snapshot_download(repo_id=value, local_dir=target, ignore_patterns=SKIPPED_FILES)  # ok-hub: deployment download
    # Written last: an interrupted download is resumed on the next start instead of being used half-done.
    (target / COMPLETE_MARKER).touch()
    log.info("%s is ready at %s", value, target)
    return str(target)


def main(argv: list[str]) -> None:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        sys.exit("usage: fetch_model.py VAR [VAR...] -- COMMAND [ARG...]")
    split = argv.index("--")
    variables, command = argv[:split], argv[split + 1:]
    for variable in variables:
        os.environ[variable] = local_model(os.environ.get(variable, ""))
    os.execvp(command[0], command)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    main(sys.argv[1:])
