"""The CPU stack in containers, end to end: `make images`, `docker-compose -f compose.cpu.yaml up`, and then what a
user and an operator do to it (ingest, ask, restart the retriever, lose the llm and get it back), then `down -v`.

Needs a Docker engine and Debian's `docker-compose` (1.29): `.ci/run` installs both, and this module starts
`dockerd` itself when none runs (and stops it again if it started it and nothing else runs on it). The first run
builds the base image and the images (about 10 minutes on 2 cores); later runs reuse every cached layer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scripts.demo import COLLECTION, ask
from tests.e2e.test_demo import ANSWER_FACT, QUESTION, SOURCE_DOCUMENT
from tests.e2e.test_image_dependencies import FLAVOURS
from tests.e2e.test_launcher import free_base_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_CPU = ROOT / "compose.cpu.yaml"
SERVICES = ("llm", "embed", "rerank", "retriever")
APP_UID = 10001
VOLUME_MOUNTS = {"llm": ["/models"], "embed": ["/models"], "rerank": ["/models"], "retriever": ["/models", "/data"]}
# Tags of this checkout's own: other checkouts on the machine build and run theirs at the same time. Under
# `.ci/run`, the tag its background build gave them.
IMAGE_TAG = os.environ.get("CI_IMAGES_TAG") or "cpu-" + hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]
MISSING_TOOLS = [tool for tool in ("docker", "docker-compose", "dockerd") if shutil.which(tool) is None]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.images,  # collected last (tests/conftest.py), after the rest of the suite
    pytest.mark.timeout(3600),  # the first run builds the base image and the images
    pytest.mark.skipif(bool(MISSING_TOOLS), reason=f"needs {', '.join(MISSING_TOOLS)} (apt-get install docker.io "
                                                   "docker-compose debootstrap; .ci/run does it)"),
]


def run(*command: str, timeout: float = 600, check: bool = True, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def engine_running() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A running Docker engine: the one already there, or a `dockerd` started here (and stopped afterwards)."""
    started = None
    if not engine_running():
        log = (tmp_path_factory.mktemp("dockerd") / "dockerd.log").open("w")
        started = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not engine_running():
            assert started.poll() is None, f"dockerd exited {started.returncode}; see {log.name}"
            assert time.monotonic() < deadline, f"dockerd not ready after 120 s; see {log.name}"
            time.sleep(1)
    yield
    if started is not None and not run("docker", "ps", "-q", check=False).stdout.strip():
        started.terminate()
        started.wait(timeout=60)


def wait_for_background_build() -> bool:
    """`.ci/run` builds the images (`make images`, tagged $CI_IMAGES_TAG) in the background while the rest of the
    suite runs: wait for it to finish (its exit status lands in $CI_IMAGES_STATUS). False where nothing builds
    them in the background."""
    status_file = os.environ.get("CI_IMAGES_STATUS")
    if not status_file:
        return False
    started = time.monotonic()
    while not Path(status_file).exists():
        assert time.monotonic() - started < 3600, "the background image build did not finish within an hour"
        time.sleep(5)
    log = Path(os.environ.get("CI_IMAGES_LOG", "/dev/null"))
    status = Path(status_file).read_text().strip()
    tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    assert status == "0", f"the background image build failed (exit {status}):\n{tail}"
    print(f"waited {time.monotonic() - started:.0f} s for the background image build", file=sys.stderr)
    return True


@pytest.fixture(scope="module")
def images(engine: None) -> dict[str, str]:
    """The four CPU images, built by the same Makefile target a user runs (cached layers make reruns quick), here
    or by `.ci/run` in the background."""
    if not wait_for_background_build():
        started = time.monotonic()
        run("make", "-s", "images", timeout=3600, env={"CPU_IMAGE_TAG": IMAGE_TAG})
        print(f"make images: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return {name: f"rag-platform/{name}:{IMAGE_TAG}" for name in SERVICES}


class Stack:
    """One compose project of compose.cpu.yaml, under a name of its own and on a free port."""

    def __init__(self) -> None:
        self.project = f"ragtest{uuid.uuid4().hex[:8]}"
        self.port = free_base_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"RETRIEVER_PUBLISHED_PORT": str(self.port), "CPU_IMAGE_TAG": IMAGE_TAG}

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("docker-compose", "-f", str(COMPOSE_CPU), "-p", self.project, *args, timeout=timeout,
                   check=check, env=self.env)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def health(self, service: str) -> str:
        container = self.container(service)
        if not container:
            return "absent"
        state = json.loads(run("docker", "inspect", "--format", "{{json .State}}", container).stdout)
        return state.get("Health", {}).get("Status") or state["Status"]

    def wait_healthy(self, services: tuple[str, ...] = SERVICES, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        # `unhealthy` can be passing (probes timing out on a loaded machine), so only a stopped container or the
        # deadline ends the wait early.
        while (states := {name: self.health(name) for name in services}) and \
                any(state != "healthy" for state in states.values()):
            if time.monotonic() > deadline or {"exited", "dead", "absent"} & set(states.values()):
                logs = self.compose("logs", "--no-color", "--tail", "40", check=False).stdout
                raise AssertionError(f"not healthy after {timeout:.0f} s: {states}\n{logs[-6000:]}")
            time.sleep(3)

    def volumes(self) -> list[str]:
        listed = run("docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={self.project}")
        return listed.stdout.split()


@pytest.fixture(scope="module")
def stack(images: dict[str, str]) -> Iterator[Stack]:
    stack = Stack()
    try:
        started = time.monotonic()
        # --no-build: `make images` built them; compose must not rebuild with another builder.
        stack.compose("up", "-d", "--no-build", timeout=1800)
        stack.wait_healthy()
        print(f"up to all healthy: {time.monotonic() - started:.0f} s", file=sys.stderr)
        yield stack
    finally:
        stack.compose("down", "-v", "--timeout", "30", check=False, timeout=300)
    assert stack.volumes() == [], "down -v left volumes behind"


def test_images_are_what_the_dependency_test_resolves_for(images: dict[str, str]) -> None:
    """The CPU image's Python and glibc are the tags tests/e2e/test_image_dependencies.py resolves with."""
    probe = "import platform, sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}', platform.libc_ver()[1])"
    python, glibc = run("docker", "run", "--rm", "--entrypoint", "python", images["llm"], "-c", probe
                        ).stdout.split()
    expected = FLAVOURS["cpu"]
    assert (python, glibc) == (expected.python, f"{expected.glibc[0]}.{expected.glibc[1]}")


def test_images_run_unprivileged_without_the_torch_wheel(images: dict[str, str]) -> None:
    for name, image in images.items():
        inspected = json.loads(run("docker", "image", "inspect", image).stdout)[0]
        assert inspected["Config"]["User"] == "app", name
        # The torch stage copied docker/wheels/ to /tmp/wheels; only its venv reaches the service images.
        found = run("docker", "run", "--rm", "--entrypoint", "sh", image, "-c", "id -u; ls /tmp/wheels 2>&1 || true"
                    ).stdout
        assert found.split()[0] == str(APP_UID) and "No such file" in found, f"{name}: {found}"


def test_volume_mount_points_ship_empty(images: dict[str, str]) -> None:
    """Nothing in an image lies where a volume is mounted. Docker copies that content into a fresh named volume, and
    compose creates the services sharing `models` at once, so their copies race and one fails ("failed to mkdir
    .../_data/hf: file exists", moby#43068); it failed this module's `up` once in CI, when the images had /models/hf.
    The mount points are the app user's, so a fresh volume is still writable by it (the stack test writes each)."""
    for name, image in images.items():
        mounts = " ".join(VOLUME_MOUNTS[name])
        found = run("docker", "run", "--rm", "--entrypoint", "sh", image, "-c",
                    f"stat -c '%u %n' {mounts}; find {mounts} -mindepth 1").stdout.splitlines()
        assert found == [f"{APP_UID} {mount}" for mount in VOLUME_MOUNTS[name]], f"{name}: {found}"


def test_a_baked_model_is_found_under_the_models_volume(images: dict[str, str]) -> None:
    """A model baked into an image (`--build-arg BAKED_MODEL=org/name`) lies outside /models, so the volume mounted
    there hides nothing: the entrypoint resolves the hub id to the baked folder, offline. The build here puts a
    finished folder where the Dockerfile's bake step does (nothing can be fetched from the hub here)."""
    image, volume = f"rag-platform/embed-baked:{IMAGE_TAG}", f"ragtest-baked-{uuid.uuid4().hex[:8]}"
    recipe = (f"FROM {images['embed']}\n"
              "RUN mkdir -p $BAKED_HF_HOME/models/acme/baked && touch $BAKED_HF_HOME/models/acme/baked/.fetched\n")
    subprocess.run(["docker", "build", "-q", "-t", image, "-"], input=recipe, text=True, check=True,
                   capture_output=True, timeout=600)
    try:
        resolved = run("docker", "run", "--rm", "-v", f"{volume}:/models", "-e", "EMBED_MODEL=acme/baked",
                       "-e", "HF_HUB_OFFLINE=1", image, "sh", "-c", "echo $EMBED_MODEL").stdout.strip()
        baked_home = run("docker", "run", "--rm", "--entrypoint", "sh", image, "-c", "echo $BAKED_HF_HOME"
                         ).stdout.strip()
        assert baked_home and not baked_home.startswith("/models"), baked_home
        assert resolved == f"{baked_home}/models/acme/baked", resolved
    finally:
        run("docker", "volume", "rm", "-f", volume, check=False)
        run("docker", "rmi", "-f", image, check=False)


def test_stack_serves_answers_and_survives_restarts(stack: Stack) -> None:
    # The app user can write every volume it mounts.
    for service, mounts in VOLUME_MOUNTS.items():
        for mount in mounts:
            probe = f"id -u && touch {mount}/.write-probe && rm {mount}/.write-probe"
            assert stack.compose("exec", "-T", service, "sh", "-c", probe).stdout.split() == [str(APP_UID)]

    # The llm image has the C compiler its CPU kernels are built with: the decode attention kernel and, in bf16,
    # inductor's compiled kernels (without one both fall back to slower torch code, with a warning).
    llm_log = stack.compose("logs", "--no-color", "llm").stdout
    assert "CPU decode attention: C kernel" in llm_log and "not compiled" not in llm_log, llm_log[-4000:]

    # Only the retriever is published.
    published = {name: stack.compose("port", name, str(port), check=False).stdout.strip()
                 for name, port in (("llm", 8000), ("embed", 8001), ("rerank", 8002), ("retriever", 8080))}
    assert published["retriever"].endswith(f":{stack.port}"), published
    assert not any(published[name] for name in ("llm", "embed", "rerank")), published

    # Ingest the sample documents through the published port, with the CLI users run.
    ingest = run(sys.executable, "scripts/ingest.py", "examples/docs", "--collection", COLLECTION,
                 "--url", stack.url, timeout=600)
    assert "failed: 0" in ingest.stdout, ingest.stdout
    documents = httpx.get(f"{stack.url}/v1/documents", params={"collection_name": COLLECTION}, timeout=30)
    count = len(documents.json()["documents"])
    assert count >= 4

    # The demo question: the answer states the fact and cites the one document that has it.
    answer = ask_demo_question(stack)
    assert ANSWER_FACT in answer["choices"][0]["message"]["content"], answer
    assert answer["citations"]["results"][0]["document_name"] == SOURCE_DOCUMENT, answer["citations"]

    # The index lives in the `index` volume: a restarted retriever still has every document and finds the fact.
    stack.compose("restart", "retriever", timeout=300)
    stack.wait_healthy(("retriever",))
    documents = httpx.get(f"{stack.url}/v1/documents", params={"collection_name": COLLECTION}, timeout=30)
    assert len(documents.json()["documents"]) == count
    found = httpx.post(f"{stack.url}/v1/search", json={"query": QUESTION, "collection_names": [COLLECTION],
                                                        "top_k": 3}, timeout=120).json()
    assert found["chunks"][0]["document_name"] == SOURCE_DOCUMENT, found

    # The llm dies: the retriever answers 503 and says which dependency is gone...
    stack.compose("kill", "llm", timeout=120)
    failed = httpx.post(f"{stack.url}/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": QUESTION}], "collection_names": [COLLECTION], "max_tokens": 16})
    assert failed.status_code == 503, failed.text
    assert "llm" in failed.json()["error"]["message"], failed.text
    # ...and answers again once the llm is back.
    stack.compose("start", "llm", timeout=300)
    stack.wait_healthy(("llm",))
    answer = ask_demo_question(stack)
    assert ANSWER_FACT in answer["choices"][0]["message"]["content"], answer


def ask_demo_question(stack: Stack) -> dict:
    """The question `make demo` asks (scripts/demo.py, collection "demo"), as it asks it."""
    return ask(stack.url, QUESTION, timeout=600)


@pytest.fixture(autouse=True)
def _no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    # scripts/demo.ask sends API_KEY when the environment has one; this stack runs without.
    monkeypatch.delenv("API_KEY", raising=False)
