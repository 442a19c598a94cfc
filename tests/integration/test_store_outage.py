"""The shared state store failing under a real sidecar: a redis-server of the test's own is
killed, frozen and restarted while calls go on."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

import tether
from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory
from tests.redis_support import RedisProcess, redis_process

__all__ = ["redis_process"]  # the fixture

pytestmark = pytest.mark.services
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
PREFIX = "outage"
LIMIT = {"requests_per_s": 20, "burst": 20, "mode": "reject"}


def mock(**policies: Any) -> dict[str, Any]:
    return {"kind": "model", "type": "mock", "policies": {"retry": None, **policies}}


def upstreams() -> dict[str, Any]:
    strict = {"on_store_error": "fail_closed"}
    return {
        "open": mock(rate_limit=LIMIT),  # fail_open: a local limit at 1/2, the local breaker
        "closed": mock(rate_limit={**LIMIT, **strict}, breaker=strict),
        "steady": mock(rate_limit={"requests_per_s": 1000}),  # the load that goes on
    }


def state(server: RedisProcess) -> dict[str, Any]:
    return {"backend": "redis", "url": server.url, "key_prefix": PREFIX, "timeout_s": 0.2,
            "retry_after_s": 0.3, "replicas": 2}  # fmt: skip


class Lines(logging.Handler):
    """The messages of one logger, whatever the logging setup."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def state_log() -> Iterator[Lines]:
    logger = logging.getLogger("tether.sidecar.state")
    lines = Lines()
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(lines)
    logger.setLevel(level)


def metric(server: SidecarServer, name: str, **labels: str) -> float:
    registry = server.service.telemetry.metrics.registry
    return registry.get_sample_value(name, {"store": "redis", **labels}) or 0.0


def total(server: SidecarServer, name: str) -> float:
    """The sum of a metric's samples over all its labels."""
    registry = server.service.telemetry.metrics.registry
    return sum(sample.value for family in registry.collect() for sample in family.samples
               if sample.name == name)  # fmt: skip


def burst(client: tether.Client, upstream: str, calls: int, rate: float) -> int:
    """`calls` calls in a row; returns how many were admitted, after checking that the
    others were refused by the rate limit and that no more than `rate` per second (and
    one more) passed beyond the first `rate` (the burst)."""
    ok, started = 0, time.perf_counter()
    for _ in range(calls):
        try:
            client.model(upstream, CHAT)
            ok += 1
        except tether.RateLimitedError:
            pass
    assert rate <= ok <= rate + rate * (time.perf_counter() - started) + 1
    return ok


class SteadyLoad:
    """Sequential calls in a thread for as long as the test runs; records each latency."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.latencies: list[float] = []
        self.errors: list[Exception] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with tether.Client(self.address) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    client.model("steady", CHAT)
                except tether.TetherError as exc:
                    self.errors.append(exc)
                self.latencies.append(time.perf_counter() - started)
                time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def wait_for(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_store_killed_and_restarted_under_load(
    redis_process: RedisProcess, make_sidecar: SidecarFactory, state_log: Lines
) -> None:
    """Redis killed mid-load: calls go on (fail_open limits locally at 1/replicas, the local
    breaker admits), fail_closed refuses with UNAVAILABLE naming the store; one incident is
    counted and logged once; when Redis returns, the shared bucket decides again."""
    server = make_sidecar(upstreams(), state=state(redis_process))
    load = SteadyLoad(server.addresses[0])
    with tether.Client(server.addresses[0]) as client:
        burst(client, "open", 30, rate=20)  # the shared bucket: 20 at once, then 20/s
        redis_process.stop()
        burst(client, "open", 30, rate=10)  # the local share: 1/2 of it
        with pytest.raises(tether.StateUnavailableError) as info:
            client.model("closed", CHAT)
        assert info.value.code.name == "UNAVAILABLE"
        assert "shared state store redis://127.0.0.1" in str(info.value)
        assert info.value.metadata["store"] == "redis"
        assert metric(server, "tether_store_up") == 0
        time.sleep(0.5)  # the store is retried every 0.3 s meanwhile, calls never wait for it
        redis_process.start()
        wait_for(lambda: metric(server, "tether_store_up") == 1)
        assert client.model("closed", CHAT).upstream == "closed"
        far = int((time.time() + 100) * 1e6)  # the shared bucket owes 100 s: it decides
        redis.Redis.from_url(redis_process.url).set(f"{PREFIX}:{{open}}:requests", far)
        with pytest.raises(tether.RateLimitedError) as limited:
            client.model("open", CHAT)
        assert limited.value.retry_after_s is not None and limited.value.retry_after_s > 90
    load.stop()
    assert load.errors == [] and len(load.latencies) > 20
    assert max(load.latencies) < 0.2 + 0.15  # at most one store timeout, once
    assert metric(server, "tether_store_incidents_total") == 1
    assert total(server, "tether_store_errors_total") >= 1
    assert total(server, "tether_store_fallbacks_total") >= 30
    failed = [m for m in state_log.messages if "follow their on_store_error" in m]
    back = [m for m in state_log.messages if "is back" in m]
    assert len(failed) == 1 and len(back) == 1, state_log.messages


def test_frozen_store_costs_one_timeout(
    redis_process: RedisProcess, make_sidecar: SidecarFactory, state_log: Lines
) -> None:
    """A store that stops answering (SIGSTOP) costs the call that finds it one `timeout_s`;
    the calls after it do not wait for it, and it is used again once it answers."""
    server = make_sidecar(upstreams(), state=state(redis_process))
    assert redis_process.proc is not None
    with tether.Client(server.addresses[0]) as client:
        client.model("open", CHAT)
        os.kill(redis_process.proc.pid, signal.SIGSTOP)
        try:
            latencies = []
            for _ in range(5):
                started = time.perf_counter()
                client.model("open", CHAT)
                latencies.append(time.perf_counter() - started)
        finally:
            os.kill(redis_process.proc.pid, signal.SIGCONT)
        assert 0.2 <= latencies[0] < 0.35 and max(latencies[1:]) < 0.1
        wait_for(lambda: metric(server, "tether_store_up") == 1)
    assert metric(server, "tether_store_incidents_total") == 1
    assert any("TimeoutError" in m for m in state_log.messages)
