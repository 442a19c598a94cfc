"""The compose stack, checked without Docker: it parses, is pinned, mounts real files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"


def services() -> dict[str, dict[str, Any]]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    result: dict[str, dict[str, Any]] = data["services"]
    return result


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(host path, container path) of each bind mount; named volumes are left out."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume["target"]
        else:
            source, target = volume.split(":")[:2]
        if source.startswith(("./", "/", "../")):
            mounts.append(((ROOT / source).resolve(), target))
    return mounts


def parse(path: Path) -> None:
    """Parse a config file by its extension (other files only need to exist)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        assert yaml.safe_load(text) is not None, path
    elif path.suffix == ".json":
        json.loads(text)


def host_port(mapping: str | int | dict[str, Any]) -> int:
    """The host side of a port mapping: `[ip:]host:container`, or the long syntax."""
    if isinstance(mapping, dict):
        return int(mapping["published"])
    parts = str(mapping).split(":")
    assert len(parts) >= 2, f"{mapping}: publish on an explicit host port"
    return int(parts[-2])


def image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else ""


def test_compose_file_parses_with_the_whole_stack() -> None:
    """docker-compose.yml is YAML with the six services of the stack."""
    assert set(services()) == {
        "sidecar",
        "demo-agent",
        "otel-collector",
        "tempo",
        "prometheus",
        "grafana",
    }


def test_every_image_is_pinned() -> None:
    """Every image has an explicit tag that is not `latest`, the Dockerfile's base too."""
    for name, service in services().items():
        assert "image" in service or "build" in service, name
        if "image" in service:
            tag = image_tag(service["image"])
            assert tag and tag != "latest", f"{name}: {service['image']} is not pinned"
    (base,) = re.findall(r"^FROM\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert image_tag(base) not in ("", "latest"), base


def test_bind_mounted_files_exist_and_parse() -> None:
    """Every host path mounted into a container exists; YAML and JSON files in it parse."""
    mounts = [mount for service in services().values() for mount in bind_mounts(service)]
    assert mounts
    for host, target in mounts:
        assert host.exists(), f"{host} (mounted at {target}) does not exist"
        for path in sorted(host.rglob("*")) if host.is_dir() else [host]:
            if path.is_file():
                parse(path)


def test_host_ports_do_not_clash() -> None:
    """No host port is published twice."""
    ports = [host_port(p) for service in services().values() for p in service.get("ports", [])]
    clashes = [port for port, n in Counter(ports).items() if n > 1]
    assert ports and not clashes, clashes


def stack_config() -> Path:
    """The config file the sidecar service runs with (from its command and mounts)."""
    sidecar = services()["sidecar"]
    command = sidecar["command"]
    inside = command[command.index("--config") + 1]
    (host,) = [host for host, target in bind_mounts(sidecar) if target == inside]
    return host


def test_sidecar_config_in_the_stack_passes_check_config() -> None:
    """`tether check-config` accepts the config file the sidecar container runs with."""
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(stack_config())],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_services_agree_on_addresses() -> None:
    """The agent, Prometheus and the sidecar's config name the same ports; traces go out."""
    config = yaml.safe_load(stack_config().read_text())
    listen = config["listen"]
    assert listen["allow_remote"] is True
    grpc_port = listen["grpc"].rsplit(":", 1)[1]
    metrics_port = listen["metrics"].rsplit(":", 1)[1]
    stack = services()
    assert stack["demo-agent"]["environment"]["TETHER_ADDRESS"] == f"sidecar:{grpc_port}"
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"sidecar:{metrics_port}"]
    assert "--enable-feature=exemplar-storage" in stack["prometheus"]["command"]
    env = stack["sidecar"]["environment"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4317"
    assert env["OTEL_SERVICE_NAME"] == "tether-sidecar"


def test_demo_agent_command_uses_real_flags() -> None:
    """The flags the demo-agent service passes exist in examples/demo_agent.py."""
    command = " ".join(services()["demo-agent"]["command"])
    flags = set(re.findall(r"(--[a-z][a-z-]*)", command))
    assert "--steps" in flags
    source = (ROOT / "examples" / "demo_agent.py").read_text()
    for flag in flags:
        assert f'"{flag}"' in source, f"examples/demo_agent.py has no {flag} option"


def test_dockerfile_runs_the_sidecar_as_a_user() -> None:
    """The image runs `tether serve` on the stack's config, not as root, exposing both ports."""
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^EXPOSE\s+7700\s+9464\s*$", text, re.MULTILINE)
    assert 'CMD ["tether", "serve", "--config", "/etc/tether/tether.yaml"]' in text
