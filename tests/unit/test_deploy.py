"""Checks of deploy/: docker compose, Kubernetes manifests, systemd unit, Dockerfile.

No Docker engine or Kubernetes cluster exists on the development machine, so these are static
checks: JSON-schema checks (written here) of the fields that matter, cross-references between the
files (selectors, ports, volumes, the node config each deployment mounts and the Triton endpoint it
names), plus ``kubectl kustomize`` and ``systemd-analyze verify`` where those tools are installed.
docs/deploy.md says what was not run.
"""
from __future__ import annotations

import configparser
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dicomnode.config import Config, parse_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}
_META = {"type": "object", "required": ["name"], "properties": {"name": _NAME, "labels": {"type": "object"}}}
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": _NAME,
        "image": {"type": "string", "pattern": r"^[a-z0-9./_-]+(:[A-Za-z0-9._-]+)$"},  # a tag, never implicit latest
        "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"],
                                              "properties": {"containerPort": _PORT, "name": _NAME}}},
        "volumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
        "resources": {"type": "object"},
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["metadata", "spec"],
    "properties": {
        "metadata": {"type": "object", "required": ["labels"]},
        "spec": {"type": "object", "required": ["containers"],
                 "properties": {"containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                                "initContainers": {"type": "array", "items": _CONTAINER},
                                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}}}},
    },
}
_WORKLOAD_SPEC = {
    "type": "object",
    "required": ["selector", "template", "replicas"],
    "properties": {"replicas": {"type": "integer", "minimum": 1},
                   "selector": {"type": "object", "required": ["matchLabels"]},
                   "template": _POD_TEMPLATE},
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "Namespace": {"type": "object", "required": ["apiVersion", "metadata"], "properties": {"apiVersion": {"const": "v1"}, "metadata": _META}},
    "ConfigMap": {"type": "object", "required": ["apiVersion", "metadata", "data"],
                  "properties": {"apiVersion": {"const": "v1"}, "metadata": _META,
                                 "data": {"type": "object", "additionalProperties": {"type": "string"}}}},
    "Deployment": {"type": "object", "required": ["apiVersion", "metadata", "spec"],
                   "properties": {"apiVersion": {"const": "apps/v1"}, "metadata": _META, "spec": _WORKLOAD_SPEC}},
    "StatefulSet": {"type": "object", "required": ["apiVersion", "metadata", "spec"],
                    "properties": {"apiVersion": {"const": "apps/v1"}, "metadata": _META,
                                   "spec": {"allOf": [_WORKLOAD_SPEC, {"required": ["serviceName", "volumeClaimTemplates"]}]}}},
    "Service": {"type": "object", "required": ["apiVersion", "metadata", "spec"],
                "properties": {"apiVersion": {"const": "v1"}, "metadata": _META,
                               "spec": {"type": "object", "required": ["selector", "ports"],
                                        "properties": {"ports": {"type": "array", "minItems": 1, "items": {
                                            "type": "object", "required": ["name", "port", "targetPort"],
                                            "properties": {"port": _PORT}}}}}}},
}
COMPOSE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["services"],
    "properties": {
        "services": {
            "type": "object",
            "required": ["node", "triton", "orthanc"],
            "additionalProperties": {
                "type": "object",
                "anyOf": [{"required": ["image"]}, {"required": ["build"]}],
                "properties": {
                    "ports": {"type": "array", "items": {"type": "string", "pattern": r"^127\.0\.0\.1:\d+:\d+$"}},
                    "volumes": {"type": "array", "items": {"type": "string"}},
                    "image": {"type": "string", "pattern": r":[A-Za-z0-9._-]+$"},
                },
            },
        },
        "volumes": {"type": "object"},
    },
}


def _k8s_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_docs() if d["kind"] == kind]


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.rpartition(":")
    return host, int(port)


# ---- Kubernetes ------------------------------------------------------------------------------

def test_every_k8s_object_matches_its_schema() -> None:
    docs = _k8s_docs()
    kinds = sorted({d["kind"] for d in docs})
    assert {"ConfigMap", "Deployment", "StatefulSet", "Service"} <= set(kinds)
    for doc in docs:
        assert doc["kind"] in SCHEMAS, f"no schema for {doc['kind']}"
        jsonschema.validate(doc, SCHEMAS[doc["kind"]])


def test_k8s_selectors_ports_and_volumes_are_consistent() -> None:
    workloads = _by_kind("Deployment") + _by_kind("StatefulSet")
    configmaps = {c["metadata"]["name"] for c in _by_kind("ConfigMap")}
    for w in workloads:
        spec = w["spec"]
        tmpl_labels = spec["template"]["metadata"]["labels"]
        for k, v in spec["selector"]["matchLabels"].items():
            assert tmpl_labels.get(k) == v, f"{w['metadata']['name']}: selector does not match its pods"
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
        for c in pod["containers"] + pod.get("initContainers", []):
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claims, f"{c['name']}: mount of unknown volume {m['name']}"
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
    for svc in _by_kind("Service"):
        targets = [w for w in workloads
                   if all(w["spec"]["template"]["metadata"]["labels"].get(k) == val
                          for k, val in svc["spec"]["selector"].items())]
        assert len(targets) == 1, f"service {svc['metadata']['name']} selects {len(targets)} workloads"
        port_names = {p.get("name") for c in targets[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in port_names, f"service {svc['metadata']['name']}: no container port {p['targetPort']}"


def _k8s_node_config() -> Config:
    (cm,) = [c for c in _by_kind("ConfigMap") if c["metadata"]["name"] == "dicomnode-config"]
    return parse_config(tomllib.loads(cm["data"]["node.toml"]))


def test_k8s_node_has_persistent_data_config_and_reaches_triton_service() -> None:
    cfg = _k8s_node_config()  # raises ConfigError when the embedded node.toml is invalid
    (node,) = _by_kind("StatefulSet")
    spec = node["spec"]
    assert spec["replicas"] == 1, "SQLite + local spool: one writer"
    (container,) = spec["template"]["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim = spec["volumeClaimTemplates"][0]["metadata"]["name"]
    assert mounts.get(cfg.node.data_dir) == claim, "data_dir must be on the persistent volume"
    assert "/etc/dicomnode" in mounts
    assert container["args"][-1] == "/etc/dicomnode/node.toml"
    ports = {p["containerPort"] for p in container["ports"]}
    assert {cfg.node.port, cfg.web.port, cfg.web.metrics_port} <= ports
    assert cfg.node.bind_address == "0.0.0.0" and cfg.web.host == "0.0.0.0"
    assert cfg.web.token_env, "a status page reachable in a cluster needs a token"
    env = {e["name"] for e in container.get("env", [])}
    assert cfg.web.token_env in env
    assert spec["template"]["spec"].get("terminationGracePeriodSeconds", 30) >= 60
    # the Triton endpoint named in the config is the triton Service's HTTP port
    host, port = _host_port(cfg.triton.url)
    (triton_svc,) = [s for s in _by_kind("Service") if s["metadata"]["name"] == "triton"]
    assert host.split(".")[0] == "triton"
    assert port in {p["port"] for p in triton_svc["spec"]["ports"] if p["name"] == "http"}
    assert cfg.triton.shared_memory == "off", "node and Triton are separate pods"


def test_k8s_triton_gets_a_gpu_and_the_model_repository() -> None:
    (triton,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "triton"]
    pod = triton["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "--model-repository=/models" in c["args"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert any(m["mountPath"] == "/models" for m in c["volumeMounts"])
    (init,) = pod["initContainers"]
    assert any(m["mountPath"] == "/models" for m in init["volumeMounts"])
    assert init["command"][-2:] == ["inference.triton_repo", "/models"]  # GPU repository, built at start
    (node,) = _by_kind("StatefulSet")
    assert init["image"] == node["spec"]["template"]["spec"]["containers"][0]["image"]


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_kubectl_kustomize_builds() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: kustomize build not checked")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert all(d["metadata"].get("namespace") == "dicomnode" for d in built if d["kind"] != "Namespace")
    assert len(built) == len(_k8s_docs())


# ---- docker compose ----------------------------------------------------------------------------

def test_compose_schema_gpu_and_wiring() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    jsonschema.validate(compose, COMPOSE_SCHEMA)
    svc = compose["services"]
    triton = svc["triton"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:")
    (dev,) = triton["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    node = svc["node"]
    builder = svc["models"]  # builds the image and assembles the GPU model repository
    assert (DEPLOY / builder["build"]["context"]).resolve() == ROOT
    assert (ROOT / builder["build"]["dockerfile"]).is_file()
    assert builder["image"] == node["image"]
    assert builder["entrypoint"][-2:] == ["inference.triton_repo", "/models"]
    models_volume = next(v.split(":")[0] for v in builder["volumes"] if v.split(":")[1] == "/models")
    assert f"{models_volume}:/models:ro" in triton["volumes"] and models_volume in compose["volumes"]
    assert triton["depends_on"]["models"]["condition"] == "service_completed_successfully"
    mounts = dict(v.split(":")[:2] for v in node["volumes"])
    cfg_src = (DEPLOY / next(src for src, dst in mounts.items() if dst == "/etc/dicomnode/node.toml")).resolve()
    cfg = parse_config(tomllib.loads(cfg_src.read_text()))
    assert mounts.get("node-data") == cfg.node.data_dir and "node-data" in compose["volumes"]
    host, port = _host_port(cfg.triton.url)
    assert host == "triton" and any(p.endswith(f":{port}") for p in triton["ports"])
    assert cfg.triton.shared_memory == "off"
    assert node["depends_on"]["triton"]["condition"] == "service_healthy"
    # the PACS peer is the orthanc service, and Orthanc knows the node under the node's AE and port
    pacs = [p for p in cfg.peers if p.receives_results]
    assert len(pacs) == 1 and pacs[0].host == "orthanc"
    omounts = dict(v.split(":")[:2] for v in svc["orthanc"]["volumes"])
    ocfg = json.loads((DEPLOY / next(s for s, d in omounts.items() if d.endswith(".json"))).read_text())
    assert ocfg["DicomAet"] == pacs[0].ae_title and ocfg["DicomPort"] == pacs[0].port
    assert ["DICOMNODE", "node", cfg.node.port] in ocfg["DicomModalities"].values()
    assert ocfg["DicomModalities"] and cfg.node.ae_title == "DICOMNODE"


# ---- systemd and Dockerfile ---------------------------------------------------------------------

def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((DEPLOY / "dicomnode.service").read_text())
    return cp


def test_systemd_unit_fields() -> None:
    u = _unit()
    assert {"Unit", "Service", "Install"} <= set(u.sections())
    s = u["Service"]
    assert re.search(r"/dicomnode serve --config \S+\.toml$", s["ExecStart"])
    assert s["User"] != "root" and s["NoNewPrivileges"] == "yes" and s["ProtectSystem"] == "strict"
    assert s["KillSignal"] == "SIGTERM" and int(s["TimeoutStopSec"]) >= 60
    assert "/var/lib/dicomnode" in s["ReadWritePaths"]
    assert u["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    exe = ROOT / ".venv" / "bin" / "dicomnode"
    if not exe.exists():
        pytest.skip("the node is not installed in .venv")
    text = (DEPLOY / "dicomnode.service").read_text().replace("/opt/dicomnode/.venv/bin/dicomnode", str(exe))
    unit = tmp_path / "dicomnode.service"
    unit.write_text(text)
    out = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "dicomnode.service" in line and "Documentation" not in line]
    assert not problems, problems


def test_dockerfile_copies_existing_paths_and_exposes_config_ports() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    cfg = parse_config(tomllib.loads((DEPLOY / "node.docker.toml").read_text()))
    exposed = {int(p) for p in re.search(r"^EXPOSE (.+)$", text, re.M).group(1).split()}  # type: ignore[union-attr]
    assert {cfg.node.port, cfg.web.port, cfg.web.metrics_port} <= exposed
    assert re.search(r"^USER (?!root)\S+", text, re.M)


def test_gpu_model_repository_is_assembled_from_the_shipped_models(tmp_path: Path) -> None:
    """What the compose ``models`` service and the k8s init container run, on the real repository."""
    from dicomnode.infer.models import load_manifest
    from inference.triton_repo import PROJECT_REPO, make_gpu_repo

    shipped = sorted(p.parent.name for p in PROJECT_REPO.glob("*/labels.json"))
    assert shipped, "no models in triton_models/"
    names = make_gpu_repo(PROJECT_REPO, tmp_path)
    assert sorted(names) == shipped
    for name in names:
        cfg = (tmp_path / name / "config.pbtxt").read_text()
        assert 'platform: "onnxruntime_onnx"' in cfg and "KIND_GPU" in cfg and f'name: "{name}"' in cfg
        assert (tmp_path / name / "1" / "model.onnx").stat().st_size > 0
        assert not (tmp_path / name / "1" / "model.py").exists()  # no python backend on the GPU server
        assert load_manifest(tmp_path / name / "labels.json").name == name


def test_dockerfile_installs_editable_so_resources_resolve() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install -e \.", text, re.M), "resources (triton_models, config/) resolve next to the package"
    assert "COPY triton_models ./triton_models" in text and "COPY inference ./inference" in text
