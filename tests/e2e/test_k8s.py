"""The Kubernetes manifests: every overlay rendered by kustomize, validated against the Kubernetes 1.37 schema,
scanned by checkov, and read for what they promise (probes, GPUs, the retriever's shape, compose's env vars).

kubectl (with its built-in kustomize) comes with the machine; kubernetes-validate and checkov live in their own
virtualenv, `.venv-k8s`, which `make test` creates (`make k8s-tools`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
KUBERNETES_VERSION = "1.37.0"
PORTS = {"llm": 8000, "embed": 8001, "rerank": 8002, "retriever": 8080}
MODEL_SERVICES = ("llm", "embed", "rerank")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Checks skipped on purpose; each skip is annotated on the object with its reason.
ALLOWED_SKIPS = {"CKV_K8S_43", "CKV_K8S_35"}


def tool(name: str) -> str | None:
    local = ROOT / ".venv-k8s" / "bin" / name
    return str(local) if local.exists() else shutil.which(name)


KUBECTL, VALIDATE, CHECKOV = tool("kubectl"), tool("kubernetes-validate"), tool("checkov")


def render(overlay: Path) -> str:
    result = subprocess.run([KUBECTL or "kubectl", "kustomize", str(overlay)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if KUBECTL is None:
        reason = "kubectl is not installed (.ci/run installs it)"
        if os.environ.get("CI"):  # under CI a missing tool must not pass as a skip
            pytest.fail(reason)
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("rendered")
    files = {}
    for name in OVERLAYS:
        files[name] = folder / f"{name}.yaml"
        files[name].write_text(render(K8S / "overlays" / name))
    return files


def objects(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(docs: list[dict], kind: str, name: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def workloads(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] in WORKLOAD_KINDS}


def container(workload: dict) -> dict:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def env_of(workload: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(workload).get("env", [])}


def test_the_four_overlays_exist() -> None:
    assert OVERLAYS == ["cpu", "cpu-local", "gpu", "gpu-local"]


@pytest.mark.skipif(VALIDATE is None, reason="kubernetes-validate is not installed (make k8s-tools)")
def test_every_overlay_passes_strict_schema_validation(rendered: dict[str, Path]) -> None:
    for name, path in rendered.items():
        result = subprocess.run([VALIDATE or "", "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(path)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"


@pytest.mark.skipif(VALIDATE is None, reason="kubernetes-validate is not installed (make k8s-tools)")
@pytest.mark.parametrize("breakage", ["unknown field", "port as text"])
def test_schema_validation_rejects_a_broken_copy(rendered: dict[str, Path], tmp_path: Path, breakage: str) -> None:
    """The control for the test above: the validator does reject what Kubernetes would."""
    docs = objects(rendered["gpu"])
    llm = find(docs, "Deployment", "llm")
    if breakage == "unknown field":
        llm["spec"]["replicaz"] = 2
    else:
        container(llm)["ports"][0]["containerPort"] = "eight thousand"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all(docs))
    result = subprocess.run([VALIDATE or "", "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(broken)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, breakage


@pytest.mark.skipif(CHECKOV is None, reason="checkov is not installed (make k8s-tools)")
def test_checkov_finds_nothing_but_annotated_skips(rendered: dict[str, Path], tmp_path: Path) -> None:
    """One checkov run over every overlay plus a deliberately bad pod: only the bad pod may fail."""
    scan = tmp_path / "scan"
    scan.mkdir()
    for path in rendered.values():
        shutil.copy(path, scan / path.name)
    bad = find(objects(rendered["cpu"]), "Deployment", "rerank")
    bad["metadata"]["name"] = "privileged-control"
    container(bad)["securityContext"] = {"privileged": True, "allowPrivilegeEscalation": True}
    (scan / "control.yaml").write_text(yaml.safe_dump(bad))
    result = subprocess.run([CHECKOV or "", "-d", str(scan), "--framework", "kubernetes", "--skip-download",
                             "-o", "json"], capture_output=True, text=True, timeout=600)
    report = json.loads(result.stdout)
    failed = report["results"]["failed_checks"]
    assert {f["file_path"].lstrip("/") for f in failed} == {"control.yaml"}, [
        (f["file_path"], f["check_id"], f["resource"]) for f in failed if "control" not in f["file_path"]]
    assert "CKV_K8S_16" in {f["check_id"] for f in failed}  # privileged container: the control is caught
    skipped = report["results"]["skipped_checks"]
    assert {s["check_id"] for s in skipped} <= ALLOWED_SKIPS
    for skip in skipped:
        assert len(skip["check_result"].get("suppress_comment", "").strip()) > 20, skip["check_id"]
    assert report["summary"]["passed"] > 1000


def test_probes_ports_and_resources(rendered: dict[str, Path]) -> None:
    for name, path in rendered.items():
        docs = objects(path)
        found = workloads(docs)
        assert set(found) == set(PORTS), name
        for service, port in PORTS.items():
            spec = container(found[service])
            assert spec["ports"] == [{"name": "http", "containerPort": port}], (name, service)
            assert spec["readinessProbe"]["httpGet"] == {"path": "/v1/health/ready", "port": "http"}
            assert spec["livenessProbe"]["httpGet"] == {"path": "/v1/health/live", "port": "http"}
            assert spec["startupProbe"]["httpGet"]["path"] == "/v1/health/live"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(spec["resources"][bound]), (name, service, bound)
            assert find(docs, "Service", service)["spec"]["ports"][0]["port"] == port
            selector = find(docs, "PodDisruptionBudget", service)["spec"]["selector"]["matchLabels"]
            assert selector.items() <= found[service]["spec"]["template"]["metadata"]["labels"].items()
            assert found[service]["metadata"]["namespace"] == "rag"
            api_key = env_of(found[service])["API_KEY"]["valueFrom"]["secretKeyRef"]
            assert api_key["name"] == "rag-api-key" and api_key["key"] == "API_KEY"


def test_gpus_only_in_the_gpu_overlays(rendered: dict[str, Path]) -> None:
    for name, path in rendered.items():
        found = workloads(objects(path))
        for service in PORTS:
            resources = container(found[service])["resources"]
            gpus = resources["limits"].get("nvidia.com/gpu")
            if name.startswith("gpu") and service in MODEL_SERVICES:
                assert gpus == 1 and resources["requests"]["nvidia.com/gpu"] == 1, (name, service)
                assert env_of(found[service])[f"{service.upper()}_DEVICE"]["value"] == "cuda"
            else:
                assert gpus is None, (name, service)


def test_retriever_shape_follows_the_vector_store(rendered: dict[str, Path]) -> None:
    for name, path in rendered.items():
        docs = objects(path)
        retriever = workloads(docs)["retriever"]
        store = env_of(retriever)["RETRIEVER_VECTOR_STORE"]["value"]
        autoscalers = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "HorizontalPodAutoscaler"}
        if name.endswith("-local"):
            assert store == "local"
            assert retriever["kind"] == "StatefulSet" and retriever["spec"]["replicas"] == 1
            assert retriever["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]
            assert "retriever" not in autoscalers
        else:
            assert store == "milvus"
            assert retriever["kind"] == "Deployment"
            assert env_of(retriever)["RETRIEVER_MILVUS_URI"]["value"] == "http://milvus:19530"
            assert autoscalers["retriever"]["spec"]["scaleTargetRef"]["kind"] == "Deployment"
            assert autoscalers["retriever"]["spec"]["minReplicas"] >= 2
            assert find(docs, "PodDisruptionBudget", "retriever")["spec"]["minAvailable"] == 1
            claims = [v for v in retriever["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v]
            assert [v["persistentVolumeClaim"]["claimName"] for v in claims] == ["model-cache"]
        assert ("embed" in autoscalers) == name.startswith("cpu"), name


def compose_services() -> dict[str, dict]:
    """compose.yaml's services with what they `extends` from docker/compose.base.yaml merged in (env, healthcheck)."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for service in services.values():
        if "extends" in service:
            base = yaml.safe_load((ROOT / service["extends"]["file"]).read_text())["services"]
            parent = base[service["extends"]["service"]]
            for key in ("environment", "healthcheck"):
                service[key] = {**parent.get(key, {}), **service.get(key, {})}
    return services


# compose splits one card between the four services (shares adding up to 0.95); each GPU pod in the cluster has a
# card of its own, so these are the one place the two deployments differ on purpose.
SHARED_CARD_SETTINGS = {f"{name.upper()}_GPU_MEMORY_UTILIZATION" for name in PORTS}


def compose_environment() -> dict[str, dict[str, str]]:
    """compose.yaml's environment per service, `${VAR:-default}` resolved to its default (an unset env)."""
    services = compose_services()
    resolved = {}
    for name in PORTS:
        env = services[name]["environment"]
        resolved[name] = {key: re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", str(value))
                          for key, value in env.items() if key not in SHARED_CARD_SETTINGS}
    return resolved


def test_gpu_overlay_uses_composes_env_vars_and_probes(rendered: dict[str, Path]) -> None:
    compose = compose_services()
    found = workloads(objects(rendered["gpu"]))
    for service, expected in compose_environment().items():
        env = env_of(found[service])
        missing = set(expected) - set(env)
        assert not missing, (service, missing)
        for key, value in expected.items():
            if "valueFrom" in env[key]:
                assert value == "", (service, key)  # secrets: empty unless set, in both
            else:
                assert env[key]["value"] == value, (service, key)
        probe = container(found[service])["readinessProbe"]["httpGet"]["path"]
        assert f"127.0.0.1:{PORTS[service]}{probe}" in " ".join(compose[service]["healthcheck"]["test"])
