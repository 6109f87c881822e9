"""What each image installs resolves, for that image's Python and platform, before anyone builds it.

The pip installs of every stage a service image is built from are read from docker/Dockerfile (with the flavour's
build arguments: the defaults for GPU, compose.cpu.yaml's for CPU) and resolved together by pip itself:
`pip install --dry-run --report --only-binary :all:` with the base image's Python version and manylinux tags,
against the public package index only (this machine's pip config and wheelhouses are left out). A conflict, or a
pin with no wheel for the image, fails here; a build would fail the same way minutes later, and the GPU images
can't be built on this machine at all. The control test shows the old `triton==3.9.0` pin fails.

One substitution: the PyTorch CUDA index (the GPU flavour's torch source) can't be reached from here, and the CPU
wheel comes from a local wheelhouse, so both resolve PyPI's default Linux `torch==2.13.0` instead. That wheel is
itself a CUDA build, with the same `triton==3.7.1` requirement, so a Triton conflict shows up the same way.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE_CPU = ROOT / "compose.cpu.yaml"
TARGETS = ("llm", "embed", "rerank", "retriever")


@dataclass(frozen=True, slots=True)
class Flavour:
    """A base image and the Python/glibc it ships, which decide the wheels pip may pick."""

    base_image: str
    python: str
    glibc: tuple[int, int]
    build_args: dict[str, str] = field(default_factory=dict)

    def platforms(self) -> list[str]:
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_x86_64" for m in range(minor, 4, -1)]
        return [*tags, "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]


def cpu_build_args() -> dict[str, str]:
    """compose.cpu.yaml's build args, `${VAR:-default}` taken at its default."""
    args = yaml.safe_load(COMPOSE_CPU.read_text())["x-build"]["args"]
    return {name: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(value)) for name, value in args.items()}


FLAVOURS = {
    # nvidia/cuda:12.8.1-runtime-ubuntu24.04: Ubuntu 24.04's python3 is 3.12, its glibc 2.39.
    "gpu": Flavour("nvidia/cuda:12.8.1-runtime-ubuntu24.04", "3.12", (2, 39)),
    # docker/base-image.sh: Debian bookworm, python3 3.11, glibc 2.36 (tests/e2e/test_containers.py checks).
    "cpu": Flavour("rag-platform/debian:bookworm", "3.11", (2, 36), cpu_build_args()),
}


@dataclass(slots=True)
class PipInstall:
    requirements: list[str]
    no_deps: bool


@dataclass(slots=True)
class Stage:
    name: str
    parent: str
    copies_from: list[str] = field(default_factory=list)
    args: dict[str, str] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) pairs, continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def parse_stages(text: str, build_args: dict[str, str]) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARGs (build args applied) and the stages by name."""
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, rest in instructions(text):
        if keyword == "FROM":
            image, _, name = expand(rest, global_args).partition(" AS ")
            current = stages[name.strip()] = Stage(name.strip(), image.strip())
        elif keyword == "ARG":
            name, _, default = rest.partition("=")
            scope = global_args if current is None else current.args
            scope[name] = build_args.get(name, global_args.get(name, default.strip('"')))
        elif keyword == "RUN" and current is not None:
            current.runs.append(rest)
        elif keyword == "COPY" and current is not None and rest.startswith("--from="):
            current.copies_from.append(rest.split()[0].removeprefix("--from="))
    return global_args, stages


def expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def pip_installs(run: str, variables: dict[str, str]) -> list[PipInstall]:
    """The `pip install` commands one RUN executes: `&&`/`;` chains, `if [ -n ... ]; then ... fi` evaluated."""
    lexer = shlex.shlex(expand(run, variables), posix=True, punctuation_chars=";&")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", ";"):
            commands.append([])
        else:
            commands[-1].append(token)
    found, skipping = [], False
    for command in filter(None, commands):
        if command[0] == "if":
            assert command[1:3] == ["[", "-n"] and command[-1] == "]", f"unsupported condition: {command}"
            skipping = len(command) == 4 or not command[3]
        elif command[0] == "fi":
            skipping = False
        elif command[0] == "then":
            command = command[1:]
        if not skipping and command[:2] == ["pip", "install"]:
            options_with_values = {"--index-url", "--find-links", "--extra-index-url", "-i", "-f"}
            words = command[2:]
            requirements = [word for i, word in enumerate(words)
                            if not word.startswith("-") and (i == 0 or words[i - 1] not in options_with_values)]
            found.append(PipInstall(requirements, "--no-deps" in words))
    return found


def target_installs(target: str, flavour: Flavour) -> list[PipInstall]:
    """Every pip install, in build order, of the stages `target` is built from."""
    global_args, stages = parse_stages(DOCKERFILE.read_text(), flavour.build_args)
    chain: list[Stage] = []

    def visit(name: str) -> None:  # parents and stages copied from, before the stage itself
        if name in stages and stages[name] not in chain:
            for source in (stages[name].parent, *stages[name].copies_from):
                visit(source)
            chain.append(stages[name])

    visit(target)
    installs = []
    for stage in chain:
        for run in stage.runs:
            installs.extend(pip_installs(run, {**global_args, **stage.args}))
    return installs


def as_pypi_requirement(requirement: str, project: Path) -> str:
    """The project (`.`) by its path; torch as PyPI's default build of the same version (see the docstring)."""
    if requirement == "." or requirement.startswith(".["):
        return f"{project}{requirement[1:]}"
    if requirement.startswith("torch=="):
        return requirement.split("+")[0]
    return requirement


def pip_dry_run(requirements: list[str], flavour: Flavour, report: Path, *, no_deps: bool = False
                ) -> subprocess.CompletedProcess[str]:
    platforms = [arg for tag in flavour.platforms() for arg in ("--platform", tag)]
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--report", str(report),
               "--only-binary", ":all:", "--python-version", flavour.python, "--implementation", "cp",
               *platforms, "--target", str(report.parent / "never-written"), "--ignore-installed",
               *(["--no-deps"] if no_deps else []), *requirements]
    # The public index only, as inside the image build: no local config, wheelhouses or constraint files.
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if os.environ.get("PIP_CERT"):
        env["PIP_CERT"] = os.environ["PIP_CERT"]
    return subprocess.run(command, cwd=report.parent, env=env, capture_output=True, text=True, timeout=900)


@dataclass(slots=True)
class Resolution:
    what: str
    result: subprocess.CompletedProcess[str]
    report: Path

    def versions(self) -> dict[str, str]:
        installs = json.loads(self.report.read_text())["install"]
        return {canonical(item["metadata"]["name"]): item["metadata"]["version"] for item in installs}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True, slots=True)
class Job:
    what: str
    requirements: tuple[str, ...]
    flavour: Flavour
    no_deps: bool = False


def image_jobs(flavours: dict[str, Flavour], project: Path) -> list[Job]:
    """One job per flavour and kind (with / without dependencies): the largest install set among its targets.

    A set that resolves has every subset resolve too, and the targets' sets nest (embed's is llm's less the GPU
    extras), which the assertion checks; so resolving the largest one covers every image of the flavour.
    """
    jobs = []
    for flavour_name, flavour in flavours.items():
        for no_deps in (False, True):
            sets = {target: frozenset(as_pypi_requirement(r, project) for install in target_installs(target, flavour)
                                      if install.no_deps == no_deps for r in install.requirements)
                    for target in TARGETS}
            largest = max(sets.values(), key=len)
            assert all(requirements <= largest for requirements in sets.values()), sets
            if largest:
                targets = ",".join(target for target, requirements in sets.items() if requirements == largest)
                what = f"{flavour_name} {'--no-deps ' if no_deps else ''}{targets}"
                jobs.append(Job(what, tuple(sorted(largest)), flavour, no_deps))
    return jobs


def resolve(jobs: list[Job], workdir: Path) -> dict[str, Resolution]:
    """Every job at once (they wait on the network, not the CPU), by job description."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = []
        for index, job in enumerate(jobs):
            (workdir / str(index)).mkdir()
            report = workdir / str(index) / "report.json"
            futures.append((job.what, report, pool.submit(pip_dry_run, list(job.requirements), job.flavour, report,
                                                          no_deps=job.no_deps)))
        return {what: Resolution(what, future.result(), report) for what, report, future in futures}


def old_triton_project(workdir: Path) -> Path:
    """A copy of the project skeleton whose gpu extra still pins `triton==3.9.0`, as it did before."""
    project = workdir / "old-triton-project"
    for package in ("common", "services"):
        (project / package).mkdir(parents=True)
        (project / package / "__init__.py").touch()
    (project / "README.md").touch()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"triton==3.7.1"' in pyproject
    (project / "pyproject.toml").write_text(pyproject.replace('"triton==3.7.1"', '"triton==3.9.0"'))
    return project


CONTROL = "control: gpu llm with triton==3.9.0"


def pyproject_pins(extra: str | None = None) -> dict[str, str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = project["optional-dependencies"][extra] if extra else project["dependencies"]
    # Environment markers are dropped: every image is Linux x86-64, where each marker in pyproject.toml holds.
    pins = (pin.split(";")[0].strip() for pin in listed)
    return {canonical(name): version for name, version in (pin.split("==") for pin in pins)}


# --- the parser, on the Dockerfile as it is -------------------------------------------------------------------------

def test_flavours_match_the_dockerfile_and_compose() -> None:
    global_args, _ = parse_stages(DOCKERFILE.read_text(), {})
    assert global_args["BASE_IMAGE"] == FLAVOURS["gpu"].base_image
    assert FLAVOURS["cpu"].build_args["BASE_IMAGE"] == FLAVOURS["cpu"].base_image


# ids without "gpu" in them: tests/conftest.py skips items with a `gpu` keyword on machines without CUDA.
@pytest.mark.parametrize("flavour", FLAVOURS, ids=[f"{name}-flavour" for name in FLAVOURS])
def test_every_image_installs_torch_and_the_project(flavour: str) -> None:
    for target in TARGETS:
        requirements = [r for install in target_installs(target, FLAVOURS[flavour]) for r in install.requirements]
        assert requirements[0].startswith("torch==2.13.0"), (target, requirements)
        assert "." in requirements, (target, requirements)


def test_gpu_extras_only_in_the_gpu_llm_and_retriever_images() -> None:
    def extras(target: str, flavour: str) -> bool:
        return any(r.startswith(".[") for i in target_installs(target, FLAVOURS[flavour]) for r in i.requirements)

    assert [t for t in TARGETS if extras(t, "gpu")] == ["llm", "retriever"]
    assert [t for t in TARGETS if extras(t, "cpu")] == []


# --- the resolutions, against the package index ------------------------------------------------------------------

@pytest.fixture(scope="module")
def resolutions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Resolution]:
    workdir = tmp_path_factory.mktemp("resolve")
    old_project = old_triton_project(workdir)
    control = Job(CONTROL, tuple(sorted({as_pypi_requirement(r, old_project)
                                         for install in target_installs("llm", FLAVOURS["gpu"])
                                         if not install.no_deps for r in install.requirements})), FLAVOURS["gpu"])
    return resolve([*image_jobs(FLAVOURS, ROOT), control], workdir)


def test_every_image_resolves_for_its_python_and_platform(resolutions: dict[str, Resolution]) -> None:
    images = {what: r for what, r in resolutions.items() if what != CONTROL}
    failed = {what: r.result.stdout[-3000:] + r.result.stderr[-3000:] for what, r in images.items()
              if r.result.returncode != 0}
    assert not failed, failed
    # Both flavours, each with its dependency set and its --no-deps model packages.
    assert len(images) == 4 and {what.split()[0] for what in images} == set(FLAVOURS), list(images)


def test_resolved_versions_are_the_pinned_ones(resolutions: dict[str, Resolution]) -> None:
    pins = pyproject_pins()
    gpu_pins = pyproject_pins("gpu")
    checked = [r for what, r in resolutions.items() if what != CONTROL and "--no-deps" not in what]
    assert checked
    for resolution in checked:
        versions = resolution.versions()
        assert versions["torch"] == "2.13.0", resolution.what
        assert {name: versions.get(name) for name in pins} == pins, resolution.what
        if resolution.what.startswith("gpu"):
            assert "llm" in resolution.what and "retriever" in resolution.what
            assert {name: versions.get(name) for name in gpu_pins} == gpu_pins == {
                "faiss-gpu": "1.15.1", "triton": "3.7.1"}


def test_the_old_triton_pin_would_have_failed(resolutions: dict[str, Resolution]) -> None:
    """The control: the GPU llm image's resolution with the gpu extra's old `triton==3.9.0` pin is rejected."""
    result = resolutions[CONTROL].result
    output = result.stdout + result.stderr
    assert result.returncode != 0, "pip resolved triton==3.9.0 next to torch 2.13.0"
    assert "ResolutionImpossible" in output and "triton" in output, output[-3000:]
