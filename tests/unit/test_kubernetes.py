"""The Kubernetes example, checked without a cluster: it parses, its config validates, and
the Deployment provides what the config asks for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import Config, parse_config, secret_fields
from tests.conftest import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"


def documents() -> dict[str, dict[str, Any]]:
    """Every object of the example by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert doc["kind"] not in found, f"{path.name}: a second {doc['kind']}"
            found[doc["kind"]] = doc
    return found


def config() -> Config:
    data = documents()["ConfigMap"]["data"]["tether.yaml"]
    return parse_config(yaml.safe_load(data), "deploy/kubernetes/configmap.yaml")


def containers() -> dict[str, dict[str, Any]]:
    spec = documents()["Deployment"]["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def test_every_file_parses_and_is_applied() -> None:
    """Each YAML file holds Kubernetes objects; the kustomization names every one but the
    example Secret (created out of band)."""
    kinds = documents()
    assert {"ConfigMap", "Deployment", "Secret", "Kustomization"} <= set(kinds)
    files = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kinds["Kustomization"]["resources"]) == files - {"secret.example.yaml"}


def test_configmap_config_validates_and_shares_state() -> None:
    """The embedded tether.yaml validates; limits and breakers are shared through the Redis
    Service, the journal is in the PostgreSQL Service, replicas match the Deployment's."""
    cfg = config()
    assert cfg.state.backend == "redis" and cfg.state.url == "redis://redis:6379/0"
    assert cfg.journal.backend == "postgres" and cfg.journal.dsn_env
    assert cfg.state.replicas == documents()["Deployment"]["spec"]["replicas"]
    assert cfg.auth is not None and cfg.listen.allow_remote


def test_every_secret_the_config_names_comes_from_the_secret() -> None:
    """Each *_env variable of the config is set in the sidecar container from the Secret,
    and the example Secret has each key."""
    env = {e["name"]: e for e in containers()["tether"]["env"]}
    secret = documents()["Secret"]
    for path, variable in secret_fields(config()):
        ref = env[variable]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"], path
        assert ref["key"] in secret["stringData"], path


def test_sidecar_container_probes_scrape_and_mounts() -> None:
    """gRPC probes on the port the config listens on; scrape annotations on the metrics
    port; the ConfigMap mounted where the command reads it; the socket shared with the agent."""
    tether, agent = containers()["tether"], containers()["agent"]
    cfg = config()
    grpc_port = next(p["containerPort"] for p in tether["ports"] if p["name"] == "grpc")
    assert f"0.0.0.0:{grpc_port}" in cfg.listen.grpc
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert tether[probe]["grpc"]["port"] == grpc_port
    annotations = documents()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert cfg.listen.metrics == f"0.0.0.0:{annotations['prometheus.io/port']}"
    config_path = Path(tether["args"][tether["args"].index("--config") + 1])
    mounts = {m["name"]: m["mountPath"] for m in tether["volumeMounts"]}
    assert str(config_path.parent) == mounts["tether-config"]
    assert config_path.name in documents()["ConfigMap"]["data"]
    socket = next(a for a in cfg.listen.grpc if a.startswith("unix:"))
    agent_env = {e["name"]: e.get("value") for e in agent["env"]}
    assert agent_env["TETHER_ADDRESS"] == socket
    agent_mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert socket.removeprefix("unix:").startswith(agent_mounts["tether-socket"])
    assert mounts["tether-socket"] == agent_mounts["tether-socket"]


@pytest.mark.parametrize("name", ["deployment.yaml", "configmap.yaml", "secret.example.yaml"])
def test_no_real_secret_in_the_example(name: str) -> None:
    """The example carries placeholders only: no API key shape in any file."""
    text = (KUBERNETES / name).read_text(encoding="utf-8")
    assert "sk-" not in text.replace("sk-...", "")
