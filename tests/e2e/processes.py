"""Run the real `tether` command as a process, with a config file written for the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

import tether


def write_config(
    directory: Path, upstreams: dict[str, Any], *, metrics: str | None = None, **extra: Any
) -> tuple[Path, str]:
    """A config file in `directory` listening on a unix socket there (and serving /metrics on
    `metrics`, host:port, when given); returns (file, address)."""
    address = f"unix:{directory}/tether.sock"
    extra["journal"] = {"path": str(directory / "journal.db"), **extra.get("journal", {})}
    data = {"listen": {"grpc": address, "metrics": metrics}, "upstreams": upstreams, **extra}
    path = directory / "tether.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, address


def start_sidecar(
    config: Path, address: str, *, env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """`python -m sidecar serve` as a child process, waited on until healthy."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    command = [sys.executable, "-m", "sidecar", "serve", "--config", str(config)]
    proc = subprocess.Popen(
        [*command, "--log-level", "DEBUG"],
        stdout=out,
        stderr=out,
        env={**os.environ, **(env or {})},
    )
    with tether.Client(address) as client:
        client.wait_ready(20)
    return proc


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout_s)
