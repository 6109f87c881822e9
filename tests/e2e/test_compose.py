"""The deployment files, checked by a real Compose implementation and by reading what they declare.

`docker-compose` (Debian's 1.29 package) validates a compose file against its schema without a Docker engine.
Nothing here can build the CUDA images or download the hub models; that part is for a GPU box. The CPU variant
(compose.cpu.yaml) is also built and run, in tests/e2e/test_containers.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
COMPOSE_CPU = ROOT / "compose.cpu.yaml"
COMPOSE_PORTS = ROOT / "compose.ports.yaml"
MODEL_SERVICES = ("llm", "embed", "rerank")
SERVICES = (*MODEL_SERVICES, "retriever")
PORTS = {"llm": 8000, "embed": 8001, "rerank": 8002, "retriever": 8080}
COMPOSE_BIN = shutil.which("docker-compose")

needs_compose = pytest.mark.skipif(
    COMPOSE_BIN is None, reason="docker-compose is not installed (apt-get install -y docker-compose)")


def duration_seconds(text: str) -> float:
    """A Compose/Go duration such as '10m', '1m30s' or '600s' in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(number + unit for number, unit in parts) == text, text
    return sum(float(number) * units[unit] for number, unit in parts)


def compose_config(path: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # A clean env: the defaults in the file are what is checked, not whatever this shell exports.
    clean = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([COMPOSE_BIN or "docker-compose", "-f", str(path), *extra, "config"], cwd=path.parent,
                          env=clean, capture_output=True, text=True, timeout=60)


def resolve(*files: Path, env: dict[str, str] | None = None) -> dict:
    if COMPOSE_BIN is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    extra = [arg for path in files[1:] for arg in ("-f", str(path))]
    result = compose_config(files[0], *extra, env=env)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def resolved() -> dict:
    """The file as Compose itself resolves it (anchors merged, variables substituted)."""
    if COMPOSE_BIN is None:
        pytest.skip("docker-compose is not installed (apt-get install -y docker-compose)")
    result = compose_config(COMPOSE, "--profile", "observability")
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def resolved_cpu() -> dict:
    return resolve(COMPOSE_CPU)


@needs_compose
def test_compose_file_is_valid() -> None:
    result = compose_config(COMPOSE)
    assert result.returncode == 0, result.stderr


def write_beside_base(folder: Path, document: dict) -> Path:
    """`document` as folder/compose.yaml, with the shared file its services extend at the same relative path."""
    (folder / "docker").mkdir()
    shutil.copy(ROOT / "docker" / "compose.base.yaml", folder / "docker" / "compose.base.yaml")
    path = folder / "compose.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@needs_compose
def test_intact_copy_is_accepted(tmp_path: Path) -> None:
    """The control for the test below: the copy itself is valid, so a rejection there is the breakage's doing."""
    copy = write_beside_base(tmp_path, yaml.safe_load(COMPOSE.read_text()))
    result = compose_config(copy)
    assert result.returncode == 0, result.stderr


@needs_compose
@pytest.mark.parametrize("breakage", ["unknown key", "ports not a list", "depends on a missing service"])
def test_broken_copy_is_rejected(tmp_path: Path, breakage: str) -> None:
    document = yaml.safe_load(COMPOSE.read_text())
    if breakage == "unknown key":
        document["services"]["llm"]["gpus_please"] = True
    elif breakage == "ports not a list":
        document["services"]["embed"]["ports"] = {"host": 8001}
    else:
        document["services"]["retriever"]["depends_on"]["vectordb"] = {"condition": "service_healthy"}
    broken = write_beside_base(tmp_path, document)
    result = compose_config(broken)
    assert result.returncode != 0, f"{breakage}: docker-compose accepted it:\n{result.stdout[:2000]}"
    assert {"unknown key": "gpus_please", "ports not a list": "ports",
            "depends on a missing service": "vectordb"}[breakage] in result.stderr


def published_targets(service: dict) -> list[int]:
    return [p["target"] if isinstance(p, dict) else int(str(p).split(":")[-1]) for p in service.get("ports", [])]


@pytest.mark.parametrize("variant", ["compose.yaml", "compose.cpu.yaml"])
def test_services_ports_and_images(variant: str, resolved: dict, resolved_cpu: dict) -> None:
    services = (resolved if variant == "compose.yaml" else resolved_cpu)["services"]
    assert set(SERVICES) <= set(services)
    for name, port in PORTS.items():
        service = services[name]
        assert service["build"]["target"] == name
        assert Path(service["build"]["dockerfile"]).name == "Dockerfile"
        assert service["image"] == f"rag-platform/{name}:{'latest' if variant == 'compose.yaml' else 'cpu'}"
        # Only the retriever is published by default; the model services talk on the compose network.
        assert published_targets(service) == ([port] if name == "retriever" else []), name
        assert service["restart"] == "unless-stopped"


def test_model_services_are_published_only_on_request() -> None:
    services = resolve(COMPOSE, COMPOSE_PORTS)["services"]
    assert {name: published_targets(services[name]) for name in PORTS} == {
        name: [port] for name, port in PORTS.items()}
    cpu = resolve(COMPOSE_CPU, COMPOSE_PORTS, env={"LLM_PUBLISHED_PORT": "18000"})["services"]
    assert [p["published"] for p in cpu["llm"]["ports"]] == [18000]


def test_gpu_reservations(resolved: dict) -> None:
    # The retriever searches on the GPU too (faiss-gpu, or the exact torch index on CUDA).
    for name in SERVICES:
        devices = resolved["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}], name


def test_gpu_memory_shares_of_one_card_add_up_to_at_most_095(resolved: dict) -> None:
    from services.embed.settings import EmbedSettings
    from services.llm.settings import LLMSettings
    from services.rerank.settings import RerankSettings
    from services.retriever.settings import RetrieverSettings

    settings = {"llm": LLMSettings, "embed": EmbedSettings, "rerank": RerankSettings, "retriever": RetrieverSettings}
    shares: dict[str, float] = {}
    for name, settings_cls in settings.items():
        variable = f"{name.upper()}_GPU_MEMORY_UTILIZATION"
        # Each share is a real setting of its service (so `--help` documents it), set in compose.
        assert "gpu_memory_utilization" in settings_cls.model_fields, name
        shares[name] = float(resolved["services"][name]["environment"][variable])
    assert sum(shares.values()) <= 0.95 + 1e-9, shares
    assert shares["llm"] == max(shares.values())


def test_cpu_variant_runs_the_bundled_models_without_gpus(resolved_cpu: dict) -> None:
    for name in SERVICES:
        service = resolved_cpu["services"][name]
        assert "deploy" not in service, name
        assert service["environment"]["HF_HUB_OFFLINE"] == "1", name
        # No *_MODEL: each service loads the model bundled in its image.
        assert not [key for key in service["environment"] if key.endswith("_MODEL")], name
        args = service["build"]["args"]
        assert args["BASE_IMAGE"] == "rag-platform/debian:bookworm" and args["ACCEL_EXTRA"] == ""
        assert args["TORCH_REQUIREMENT"] == "torch==2.13.0+cpu"
    assert resolved_cpu["services"]["retriever"]["depends_on"] == {
        name: {"condition": "service_healthy"} for name in MODEL_SERVICES}


def test_grafana_has_no_default_admin_password(resolved: dict) -> None:
    grafana = resolved["services"]["grafana"]
    assert "GF_SECURITY_ADMIN_PASSWORD" not in grafana["environment"]
    assert grafana["environment"]["GRAFANA_ADMIN_PASSWORD"] == ""
    script = grafana["command"][0]
    # Unset: admin login off and a random password; set: that password.
    assert "GF_AUTH_DISABLE_LOGIN_FORM=true" in script and "/dev/urandom" in script
    assert not re.search(r"ADMIN_PASSWORD=[\"']?admin\b", script), script


def test_api_key_never_lands_in_a_volume(resolved: dict) -> None:
    """Prometheus needs the key in a file: it is written into a tmpfs, outside every volume."""
    prometheus = resolved["services"]["prometheus"]
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    key_file = Path(config["scrape_configs"][0]["authorization"]["credentials_file"])
    assert str(key_file) in prometheus["command"][0]
    assert any(key_file.is_relative_to(mount) for mount in prometheus["tmpfs"])
    for service in resolved["services"].values():
        for volume in service.get("volumes", []):
            target = volume["target"] if isinstance(volume, dict) else volume.split(":")[1]
            assert not key_file.is_relative_to(target), (key_file, target)


def test_gpu_ids_come_from_env(tmp_path: Path) -> None:
    if COMPOSE_BIN is None:
        pytest.skip("docker-compose is not installed")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LLM_GPU_IDS": "3"}
    result = subprocess.run([COMPOSE_BIN, "-f", str(COMPOSE), "config"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    llm = yaml.safe_load(result.stdout)["services"]["llm"]
    assert llm["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] == ["3"]


def test_healthchecks_probe_readiness(resolved: dict) -> None:
    for name, port in PORTS.items():
        check = resolved["services"][name]["healthcheck"]
        assert f"127.0.0.1:{port}/v1/health/ready" in " ".join(check["test"]), name
        # Long enough to download and load a model on the first start.
        assert duration_seconds(check["start_period"]) >= 120, name
    assert duration_seconds(resolved["services"]["llm"]["healthcheck"]["start_period"]) >= 600


def test_retriever_waits_for_healthy_dependencies(resolved: dict) -> None:
    retriever = resolved["services"]["retriever"]
    assert retriever["depends_on"] == {name: {"condition": "service_healthy"} for name in MODEL_SERVICES}
    env = retriever["environment"]
    assert env["RETRIEVER_EMBED_URL"] == "http://embed:8001"
    assert env["RETRIEVER_RERANK_URL"] == "http://rerank:8002"
    assert env["RETRIEVER_LLM_URL"] == "http://llm:8000"


def test_volumes_for_models_and_index(resolved: dict) -> None:
    assert {"models", "index"} <= set(resolved["volumes"])
    for name in SERVICES:
        assert "models" in volume_sources(resolved["services"][name]), name
    assert "index" in volume_sources(resolved["services"]["retriever"])


def volume_sources(service: dict) -> list[str]:
    return [str(v["source"]) if isinstance(v, dict) else v.split(":")[0] for v in service["volumes"]]


def test_default_models_are_the_gpu_deployment_models(resolved: dict) -> None:
    services = resolved["services"]
    assert services["llm"]["environment"]["LLM_MODEL"] == "Qwen/Qwen2.5-7B-Instruct"
    assert services["embed"]["environment"]["EMBED_MODEL"] == "BAAI/bge-base-en-v1.5"
    assert services["embed"]["environment"]["EMBED_QUERY_PREFIX"] == (
        "Represent this sentence for searching relevant passages: ")
    assert services["rerank"]["environment"]["RERANK_MODEL"] == "BAAI/bge-reranker-v2-m3"
    for name in SERVICES:
        assert "API_KEY" in services[name]["environment"], name


def test_observability_profile(resolved: dict) -> None:
    services = resolved["services"]
    assert services["prometheus"]["profiles"] == ["observability"]
    assert services["grafana"]["profiles"] == ["observability"]
    for name in SERVICES:
        assert "profiles" not in services[name], name


def test_prometheus_scrapes_every_service() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/v1/metrics"
    targets = {target for group in job["static_configs"] for target in group["targets"]}
    assert targets == {f"{name}:{port}" for name, port in PORTS.items()}


def test_grafana_dashboard_plots_the_platform_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/rag-platform.json").read_text())
    expressions = " ".join(t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", []))
    for metric in ("llm:time_to_first_token_seconds", "llm:inter_token_latency_seconds", "llm:generation_tokens",
                   "llm:kv_cache_usage_perc", "llm:num_requests_running", "llm:num_requests_waiting",
                   "embed_batch_size", "embed_queue_depth", "rerank_batch_size",
                   "embed_http_request_duration_seconds", "rerank_http_request_duration_seconds"):
        assert metric in expressions, metric
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/rag-platform.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"


def test_fetch_model_passes_local_models_through(tmp_path: Path) -> None:
    """A mounted directory or an empty value reaches the service unchanged, without touching the network."""
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    env = {**os.environ, "LLM_MODEL": str(model_dir), "EMBED_MODEL": "", "HF_HUB_OFFLINE": "1"}
    show = "import os; print(repr(os.environ['LLM_MODEL']), repr(os.environ['EMBED_MODEL']))"
    result = subprocess.run([sys.executable, str(ROOT / "docker/fetch_model.py"), "LLM_MODEL", "EMBED_MODEL", "--",
                             sys.executable, "-c", show], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{str(model_dir)!r} ''"


def test_fetch_model_uses_a_finished_download_without_the_hub(tmp_path: Path) -> None:
    """A hub id already fetched into the volume resolves to its folder; no network call is made (HF offline)."""
    fetched = tmp_path / "hf" / "models" / "BAAI" / "bge-base-en-v1.5"
    fetched.mkdir(parents=True)
    (fetched / ".fetched").touch()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "EMBED_MODEL": "BAAI/bge-base-en-v1.5",
           "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "docker/fetch_model.py"), "EMBED_MODEL", "--",
                             sys.executable, "-c", "import os; print(os.environ['EMBED_MODEL'])"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(fetched)


def test_fetch_model_finds_a_baked_model_before_the_volume(tmp_path: Path) -> None:
    """A model baked into the image (finished, under $BAKED_HF_HOME) is used as it is, even with another finished
    copy in the volume; a baked folder without the finished mark is passed over for the volume's copy."""
    baked = tmp_path / "baked" / "models" / "BAAI" / "bge-base-en-v1.5"
    in_volume = tmp_path / "hf" / "models" / "BAAI" / "bge-base-en-v1.5"
    for folder in (baked, in_volume):
        folder.mkdir(parents=True)
        (folder / ".fetched").touch()
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "BAKED_HF_HOME": str(tmp_path / "baked"),
           "EMBED_MODEL": "BAAI/bge-base-en-v1.5", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "docker/fetch_model.py"), "EMBED_MODEL", "--",
               sys.executable, "-c", "import os; print(os.environ['EMBED_MODEL'])"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(baked)

    (baked / ".fetched").unlink()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(in_volume)


def test_fetch_model_without_command_is_a_usage_error() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "docker/fetch_model.py"), "LLM_MODEL"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "usage" in result.stderr


def test_dockerfile_has_a_target_per_service_and_runs_unprivileged() -> None:
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    stages = {line.split()[-1] for line in dockerfile.splitlines() if line.startswith("FROM ")}
    assert set(SERVICES) <= stages
    assert "USER app" in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "run", "data", "bench/results"} <= set(ignored)
