"""Start and stop what the harness measures: the mock upstream, the OTLP receiver, sidecars
and the transport floor.

Each sidecar is a real `python -m sidecar serve` process with a config file written to the
run's temporary directory; its start-up time is measured from spawning it to the first
model call it answered. The floor (`python -m bench.floor`) listens where a sidecar would
(a unix socket for gRPC, 127.0.0.1 for HTTP) and is pinned to the same core.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

import tether
from bench.load import JSON, MODEL, PAYLOAD, UPSTREAM, http_session
from bench.plan import FLOOR, Variant
from bench.procs import LOAD_CPU, PROXY_CPU, Child, free_port, spawn, wait_line

START_TIMEOUT_S = 30.0  # a sidecar; LiteLLM gets four times as long
POLL_S = 0.005
HIGH_RATE = {"requests_per_s": 1_000_000, "burst": 1_000_000, "mode": "wait"}


@dataclass
class Proxy:
    """A proxy under test: its process, where to reach it, how long it took to start."""

    name: str
    child: Child
    http_url: str  # base URL of its OpenAI-compatible API, up to /v1
    grpc_address: str = ""
    headers: dict[str, str] | None = None  # sent with every HTTP call (auth)
    startup_s: float = 0.0  # spawn -> first answered call
    http_startup_s: float = 0.0  # spawn -> first answered call on the HTTP front


def start_mock(directory: Path) -> tuple[Child, str]:
    """The instant OpenAI-compatible upstream (`bench.upstream_server`) on the load core."""
    command = [sys.executable, "-m", "bench.upstream_server"]
    child = spawn(
        "mock-upstream", command, cpu=LOAD_CPU, stdout_pipe=True, log=directory / "mock.log"
    )
    return child, f"http://127.0.0.1:{int(wait_line(child))}"


def start_otlp_sink(directory: Path) -> tuple[Child, str]:
    """The counting OTLP/gRPC trace receiver (`bench.otlp_sink`) on the load core."""
    command = [sys.executable, "-m", "bench.otlp_sink"]
    child = spawn("otlp-sink", command, cpu=LOAD_CPU, stdout_pipe=True, log=directory / "otlp.log")
    return child, f"http://127.0.0.1:{int(wait_line(child))}"


def stop_otlp_sink(child: Child) -> int:
    """Stop the receiver; the number of spans it received."""
    child.stop()
    assert child.proc.stdout is not None
    lines = child.proc.stdout.read().decode().split()
    return int(lines[-1]) if lines else 0


def sidecar_config(variant: Variant, upstream_url: str, directory: Path, http_port: int) -> Any:
    """The config file of one sidecar variant, as data."""
    if variant.policies:
        policies: dict[str, Any] = {
            "retry": {},
            "breaker": {},
            "rate_limit": HIGH_RATE,
            "bulkhead": {"max_in_flight": 512, "max_queue": 512},
        }
    else:
        policies = {"retry": None, "breaker": None, "bulkhead": None}
    journal: dict[str, Any] = {"backend": "none"}
    if variant.journal != "none":
        path = str(directory / f"{variant.name}.db")
        journal = {"backend": "sqlite", "path": path, "synchronous": variant.journal}
    upstream = {
        "kind": "model",
        "type": "openai",
        "base_url": f"{upstream_url}/v1",
        "max_connections": 512,
        "policies": policies,
    }
    return {
        "listen": {
            "grpc": f"unix:{directory}/{variant.name}.sock",
            "http": f"127.0.0.1:{http_port}",
            "metrics": None,
        },
        "upstreams": {UPSTREAM: upstream},
        "routes": {MODEL: {"upstream": UPSTREAM}},
        "journal": journal,
        "telemetry": {"traces": "on" if variant.telemetry else "off", "log_format": "text"},
    }


def telemetry_env(otlp_endpoint: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_SERVICE_NAME": "tether-bench",
    }


async def start_sidecar(
    variant: Variant, upstream_url: str, otlp_endpoint: str, directory: Path
) -> Proxy:
    """Spawn one sidecar variant on the proxy core; wait for its first answered calls."""
    port = free_port()
    config = sidecar_config(variant, upstream_url, directory, port)
    path = directory / f"{variant.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--config",
        str(path),
        "--log-level",
        "WARNING",
    ]
    env = telemetry_env(otlp_endpoint) if variant.telemetry else {}
    child = spawn(
        f"tether-{variant.name}",
        command,
        cpu=PROXY_CPU,
        env=env,
        log=directory / f"{variant.name}.log",
    )
    address = config["listen"]["grpc"]
    proxy = Proxy(f"tether-{variant.name}", child, f"http://127.0.0.1:{port}/v1", address)
    try:
        await _first_calls(proxy)
    except BaseException:
        child.stop()
        raise
    return proxy


async def _first_calls(proxy: Proxy) -> None:
    """Record how long `proxy` took from its spawn to its first answered gRPC and HTTP calls."""
    proxy.startup_s = await first_grpc_call(proxy.child, proxy.grpc_address)
    async with http_session() as session:
        proxy.http_startup_s = await first_http_call(proxy.child, session, proxy.http_url, None)


async def start_floor(upstream_url: str, directory: Path) -> Proxy:
    """Spawn the transport floor on the proxy core; wait for its `ready` line and its first
    answered gRPC and HTTP calls."""
    port = free_port()
    address = f"unix:{directory}/{FLOOR}.sock"
    command = [sys.executable, "-m", "bench.floor", "--upstream", upstream_url]
    command += ["--grpc", address, "--http", f"127.0.0.1:{port}"]
    child = spawn(FLOOR, command, cpu=PROXY_CPU, stdout_pipe=True, log=directory / f"{FLOOR}.log")
    proxy = Proxy(FLOOR, child, f"http://127.0.0.1:{port}/v1", address)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(wait_line, child), START_TIMEOUT_S)
        if not line.startswith("ready"):
            raise RuntimeError(f"{FLOOR} said {line!r} at start:\n{child.tail()}")
        await _first_calls(proxy)
    except BaseException:
        child.stop()
        raise
    return proxy


def _connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


async def first_grpc_call(child: Child, address: str) -> float:
    """Seconds from spawning `child` to its first answered gRPC model call."""
    path = address.removeprefix("unix:")
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited at start:\n{child.tail()}")
        if _connectable(path):
            try:  # a fresh channel each try: no reconnect backoff in the figure
                async with tether.AsyncClient(address, timeout_s=5) as client:
                    await client.model(UPSTREAM, PAYLOAD)
                return time.perf_counter() - child.started_at
            except tether.SidecarUnavailableError:
                pass  # not serving yet (DrainingError is one too: it is starting)
        await asyncio.sleep(POLL_S)
    raise RuntimeError(f"{child.name} did not answer within {START_TIMEOUT_S:.0f} s")


async def first_http_call(
    child: Child, session: aiohttp.ClientSession, base_url: str, headers: dict[str, str] | None
) -> float:
    """Seconds from spawning `child` to its first answered chat completion over HTTP."""
    deadline = time.monotonic() + START_TIMEOUT_S * 4
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited at start:\n{child.tail()}")
        try:
            url = f"{base_url}/chat/completions"
            async with session.post(url, data=PAYLOAD, headers={**JSON, **(headers or {})}) as r:
                body = await r.read()
                if r.status == 200:
                    return time.perf_counter() - child.started_at
                if r.status not in (502, 503):  # not "starting": broken
                    raise RuntimeError(f"{child.name} answered {r.status}: {body[:300]!r}")
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(POLL_S * 4)
    raise RuntimeError(f"{child.name} did not answer over HTTP in time:\n{child.tail()}")
