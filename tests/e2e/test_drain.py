"""SIGTERM drains a real sidecar process: in-flight calls finish, new ones are refused."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import tether
from tests.e2e.processes import start_sidecar, stop, write_config

CHAT = {"model": "m", "messages": [{"role": "user", "content": "slow"}]}


def wait_until(predicate: object, timeout_s: float = 5) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status  # type: ignore[no-any-return]


def test_sigterm_drains_in_flight_and_refuses_new(short_tmp: Path) -> None:
    """In-flight calls complete after SIGTERM, new calls get UNAVAILABLE, the exit code is 0."""
    upstreams = {"slow": {"kind": "model", "type": "mock", "latency_ms": 1500}}
    config, address = write_config(short_tmp, upstreams, shutdown={"grace_s": 10})
    proc = start_sidecar(config, address, log=short_tmp / "sidecar.log")
    with tether.Client(address) as client, ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(client.model, "slow", CHAT) for _ in range(3)]
        wait_until(lambda: client.status().in_flight == 3)
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: health(address) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(tether.SidecarUnavailableError) as info:
            client.model("slow", CHAT)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert isinstance(info.value, tether.DrainingError)
        hits = sorted(f.result(timeout=10).json()["hit"] for f in futures)
    assert hits == [1, 2, 3]
    assert proc.wait(10) == 0
    assert not (short_tmp / "tether.sock").exists()


def test_grace_period_bounds_the_drain(short_tmp: Path) -> None:
    """A call still running when the grace period ends is cut, and the process still exits 0."""
    upstreams = {"stuck": {"kind": "model", "type": "mock", "failure_rate": 1.0,
                           "failure_kind": "hang"}}  # fmt: skip
    config, address = write_config(short_tmp, upstreams, shutdown={"grace_s": 0.5})
    proc = start_sidecar(config, address)
    with tether.Client(address) as client, ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.model, "stuck", CHAT)
        wait_until(lambda: client.status().in_flight == 1)
        started = time.monotonic()
        assert stop(proc) == 0
        assert time.monotonic() - started < 5
        with pytest.raises(tether.TetherError):
            future.result(timeout=5)
