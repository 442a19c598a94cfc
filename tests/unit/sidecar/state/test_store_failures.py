"""A shared state store that does not answer (nobody listens on its port): incidents, and
what each policy does by its `on_store_error`. No Redis needed."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from sidecar import errors, status
from sidecar.config import BreakerPolicy, RateLimitPolicy, StateConfig, parse_config
from sidecar.errors import StateUnavailableError
from sidecar.policies.base import Outcome, Verdict
from sidecar.policies.clock import SYSTEM_CLOCK
from sidecar.policies.deadline import Deadline
from sidecar.policies.shared_breaker import SharedBreaker
from sidecar.policies.shared_ratelimit import SharedRateLimiter
from sidecar.state.health import StoreHealth, StoreMetrics
from sidecar.state.store import StateStore, build_state, public_address
from sidecar.telemetry.metrics import Metrics

UP = "llm"
FAILURE = Outcome(Verdict.FAILURE, errors.UpstreamUnavailableError("down", upstream=UP))


def closed_port() -> int:
    """A loopback port nobody listens on: connections are refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
async def dead_store() -> AsyncIterator[StateStore]:
    url = f"redis://127.0.0.1:{closed_port()}/0"
    config = StateConfig(backend="redis", url=url, replicas=4, retry_after_s=30)
    store = StateStore(config, url)
    yield store
    await store.close()


def forever() -> Deadline:
    return Deadline(SYSTEM_CLOCK, None)


def limiter(store: StateStore, **policy: Any) -> SharedRateLimiter:
    return SharedRateLimiter(UP, RateLimitPolicy(**policy), SYSTEM_CLOCK, store)


async def test_fail_open_limits_locally_at_a_share(dead_store: StateStore) -> None:
    """fail_open: with 4 replicas, a 40/s limit with burst 40 admits 10 at once locally."""
    metrics = Metrics()
    dead_store.health.observe(StoreMetrics(metrics))
    rl = limiter(dead_store, requests_per_s=40, burst=40, mode="reject")
    admitted = 0
    for _ in range(20):
        try:
            await rl.admit(0, forever())
            admitted += 1
        except errors.RateLimitedError:
            pass
    assert 10 <= admitted <= 11  # (11: a tenth of a second passed meanwhile)
    assert not dead_store.up
    value = metrics.registry.get_sample_value
    assert value("tether_store_incidents_total", {"store": "redis"}) == 1
    assert value("tether_store_up", {"store": "redis"}) == 0
    labels = {"store": "redis", "upstream": UP, "policy": "rate_limit"}
    assert value("tether_store_errors_total", labels) == 1  # the first call; then not tried
    assert value("tether_store_fallbacks_total", labels) == 20
    assert rl.status()["rate_limit.requests_available"] == pytest.approx(0, abs=0.1)


async def test_fail_closed_refuses_naming_the_store(dead_store: StateStore) -> None:
    """fail_closed: the call is refused with UNAVAILABLE, the store named in the message and
    in the details, and the retry delay of the store."""
    rl = limiter(dead_store, requests_per_s=10, on_store_error="fail_closed")
    with pytest.raises(StateUnavailableError) as info:
        await rl.admit(0, forever())
    exc = info.value
    assert status.classify(exc) == (grpc.StatusCode.UNAVAILABLE, "STATE_UNAVAILABLE")
    assert exc.metadata() == {"upstream": UP, "store": "redis", "policy": "rate_limit"}
    assert "redis://127.0.0.1" in exc.message and "fails closed" in exc.message
    assert exc.retry_after_s == 30


async def test_breaker_fails_open_to_a_fresh_local_breaker(dead_store: StateStore) -> None:
    """fail_open: while the store is down the replica's own breaker decides (it trips on
    its own failures); fail_closed refuses every attempt."""
    await dead_store.start()  # the store is down from the start: an incident
    assert not dead_store.up
    policy = BreakerPolicy(fail_max=2, reset_timeout_s=30)
    local = SharedBreaker(UP, policy, SYSTEM_CLOCK, dead_store, attempt_timeout_s=1)
    for _ in range(2):
        local.admit().release(FAILURE)
    assert local.state == "open" and local.refuses()
    with pytest.raises(errors.CircuitOpenError):
        local.admit()
    strict = BreakerPolicy(on_store_error="fail_closed")
    closed = SharedBreaker("other", strict, SYSTEM_CLOCK, dead_store, attempt_timeout_s=1)
    with pytest.raises(StateUnavailableError):
        closed.admit()
    assert closed.refuses()


async def test_incident_is_logged_once_and_ends_once(caplog: pytest.LogCaptureFixture) -> None:
    """Many failures make one incident: one warning when it starts, one when a probe finds
    the store again, and the probe is what ends it."""
    answers = [OSError("refused"), None]

    async def probe() -> None:
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    health = StoreHealth("redis", "redis://r:6379/0", 0.01, probe)
    with caplog.at_level(logging.INFO, logger="tether.sidecar.state"):
        for _ in range(5):
            health.failed(TimeoutError(), UP, "rate_limit")
        assert not health.up and health.incidents == 1
        for _ in range(100):
            if health.up:
                break
            await asyncio.sleep(0.01)
    assert health.up and answers == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "failed (TimeoutError: timed out)" in warnings[0]
    assert "is back" in warnings[1] and "5 failed operations" in warnings[1]
    await health.close()


def test_addresses_in_logs_carry_no_credentials() -> None:
    """The store's address in logs and errors drops the user and password of its URL."""
    assert public_address("redis://u:secret@cache:6380/2") == "redis://cache:6380/2"
    assert public_address("rediss://:pw@cache/0") == "rediss://cache/0"
    assert public_address("unix:///run/redis.sock") == "unix:///run/redis.sock"


def test_memory_backend_has_no_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """state.backend memory builds no store; redis takes its URL from url or url_env."""
    assert build_state(parse_config({})) is None
    monkeypatch.setenv("TETHER_REDIS_URL", "redis://:pw@cache:6379/0")
    config = parse_config({"state": {"backend": "redis", "url_env": "TETHER_REDIS_URL"}})
    store = build_state(config)
    assert store is not None and store.health.where == "redis://cache:6379/0"
