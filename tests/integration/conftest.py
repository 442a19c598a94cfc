"""Fixtures: a real upstream and a real sidecar on a background loop, an address for each."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.server import SidecarServer
from tests.integration.faults import FaultServer
from tests.integration.otlp import OtlpReceiver
from tests.integration.provider import Provider
from tests.integration.support import LoopThread, UpstreamApp, sidecar_config, start_sidecar


def standard_upstreams(url: str) -> dict[str, Any]:
    """Upstreams named after what the real upstream server does for them."""

    one_shot = {"retry": None}  # these tests check single attempts; policy tests build their own

    def model(path: str, **extra: Any) -> dict[str, Any]:
        return {"kind": "model", "type": "openai", "base_url": f"{url}{path}",
                "policies": one_shot, **extra}  # fmt: skip

    return {
        "llm": model("/v1"),
        "search": {"kind": "tool", "type": "http", "url": f"{url}/tool"},
        "hang-llm": model("/hang"),
        "slow-stream": model("/slow"),
        "hang-tool": {
            "kind": "tool",
            "type": "http",
            "url": f"{url}/hang",
            "timeout_s": 0.3,
            "policies": one_shot,
        },
        "bad-request": model("/status/400"),
        "limited": model("/status/429"),
        "broken": model("/status/503"),
        "garbage": model("/garbage"),
        "reset": model("/reset"),
        "mock": {"kind": "model", "type": "mock", "policies": one_shot},
    }


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


@pytest.fixture
def faults(loop_thread: LoopThread) -> Iterator[FaultServer]:
    """A fault-injecting upstream with exact per-endpoint counts."""
    server = FaultServer()
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


@pytest.fixture
def upstream(loop_thread: LoopThread) -> Iterator[UpstreamApp]:
    app = UpstreamApp()
    loop_thread.run(app.start())
    yield app
    loop_thread.run(app.stop())


SidecarFactory = Callable[..., SidecarServer]


@pytest.fixture
def make_sidecar(loop_thread: LoopThread, short_tmp: Path) -> Iterator[SidecarFactory]:
    """Start a sidecar with the given upstreams (and config sections); drained at teardown."""
    started: list[SidecarServer] = []

    def make(upstreams: dict[str, Any], **extra: Any) -> SidecarServer:
        path = short_tmp / f"s{len(started)}.sock"
        server = loop_thread.run(start_sidecar(sidecar_config(str(path), upstreams, **extra)))
        started.append(server)
        return server

    yield make
    for server in started:
        loop_thread.run(server.drain(0))


@pytest.fixture
def sidecar(make_sidecar: SidecarFactory, upstream: UpstreamApp) -> SidecarServer:
    """A sidecar proxying the standard upstreams."""
    return make_sidecar(standard_upstreams(upstream.url))


@pytest.fixture
def address(sidecar: SidecarServer) -> str:
    """The sidecar's unix socket address."""
    return sidecar.addresses[0]


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """A real OTLP receiver; sidecars made afterwards export their spans to it."""
    server = OtlpReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", server.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "sidecar-under-test")
    yield server
    server.stop()


@pytest.fixture
def provider(loop_thread: LoopThread) -> Iterator[Provider]:
    """A fake OpenAI-compatible provider that misbehaves per model name."""
    server = Provider()
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())
