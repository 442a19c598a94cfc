"""The pipeline's composition on a manual clock: retries against the breaker, attempt counts,
permits given back whatever happens, Retry-After bounds, the default retry budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

import pytest

from sidecar import errors
from sidecar.config import parse_config
from sidecar.pipeline import Pipeline
from sidecar.policies.base import Outcome, Verdict
from sidecar.policies.clock import ManualClock
from sidecar.routes import CallTrace, StreamInfo
from sidecar.upstreams.base import Chunk, UpstreamRequest, UpstreamResponse

T = TypeVar("T")
REQUEST = UpstreamRequest("chat", b"{}", {"messages": [], "max_tokens": 10})
FAST = {"max_attempts": 4, "backoff_initial_s": 0.01, "backoff_max_s": 0.05, "jitter": "none",
        "budget_min_retries": 10}  # fmt: skip


class Fake:
    """An upstream that fails its first `fail` calls (all when None) with `error`."""

    kind = "model"
    type = "fake"
    timeout_s = 5.0
    supports_stream = True

    def __init__(self, name: str, fail: int | None = None, retry_after_s: float | None = None):
        self.name = name
        self.fail = fail
        self.retry_after_s = retry_after_s
        self.hits = 0
        self.close_raises = False

    def _failing(self) -> bool:
        self.hits += 1
        return self.fail is None or self.hits <= self.fail

    def _error(self) -> errors.UpstreamError:
        return errors.UpstreamUnavailableError(
            "down", upstream=self.name, http_status=503, retry_after_s=self.retry_after_s
        )

    async def call(self, request: UpstreamRequest) -> UpstreamResponse:
        if self._failing():
            raise self._error()
        return UpstreamResponse(b"{}")

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[Chunk]:
        if self._failing():
            raise self._error()
        try:
            for i in range(3):
                yield Chunk(b"%d" % i)
        finally:
            if self.close_raises:
                raise RuntimeError("aclose failed")

    def validate(self, request: UpstreamRequest) -> None: ...

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits}

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def pipeline(clock: ManualClock, fakes: list[Fake], **policies: Any) -> Pipeline:
    specs = {f.name: {"kind": "model", "type": "mock", "policies": policies.get(f.name, {})}
             for f in fakes}  # fmt: skip
    return Pipeline(parse_config({"upstreams": specs}), {f.name: f for f in fakes}, clock)


async def drive(clock: ManualClock, work: Awaitable[T], step_s: float = 0.01) -> T:
    """Run `work`, moving the clock on whenever it waits for it."""
    task = asyncio.ensure_future(work)
    for _ in range(10_000):
        if task.done():
            break
        await clock.advance(step_s)
    return await task


async def test_breaker_tripping_mid_retry_returns_the_last_upstream_error() -> None:
    """The attempt that trips the breaker ends the call with its own error and the attempts
    made: no backoff is slept for an attempt the breaker would refuse."""
    clock = ManualClock()
    fake = Fake("u")
    p = pipeline(clock, [fake], u={"retry": FAST, "breaker": {"fail_max": 2}})
    route = p.routes["u"]
    trace = CallTrace()
    with pytest.raises(errors.UpstreamUnavailableError) as info:
        await drive(clock, p.call(route, REQUEST, p.deadline(None), trace))
    assert info.value.attempts == 2 and trace.attempts == 2 and fake.hits == 2
    assert route.breaker is not None and route.breaker.state == "open"
    assert route.breaker.rejected == 0  # no attempt was sent to be refused
    assert route.retrier is not None and route.retrier.retries == 1
    assert clock.sleepers == 0


async def test_refused_retry_carries_attempts_and_is_not_counted() -> None:
    """A retry refused by a breaker another call tripped during the backoff: the refusal
    carries the attempts made, and the retry that never happened is not counted."""
    clock = ManualClock()
    fake = Fake("u")
    retry = {**FAST, "backoff_initial_s": 1.0, "backoff_max_s": 1.0}
    p = pipeline(clock, [fake], u={"retry": retry, "breaker": {"fail_max": 5}})
    route = p.routes["u"]
    assert route.breaker is not None and route.retrier is not None
    task = asyncio.ensure_future(p.call(route, REQUEST, p.deadline(None)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert clock.sleepers == 1 and fake.hits == 1  # the first attempt failed; backing off
    failure = Outcome(Verdict.FAILURE, errors.UpstreamUnavailableError("x", upstream="u"))
    for _ in range(4):  # other calls trip it meanwhile
        route.breaker.admit().release(failure)
    assert route.breaker.state == "open"
    await clock.advance(1.0)
    with pytest.raises(errors.CircuitOpenError) as info:
        await task
    assert info.value.attempts == 1 and info.value.metadata()["attempts"] == "1"
    assert route.retrier.retries == 0 and fake.hits == 1


async def test_refused_primary_stream_counts_one_attempt_for_the_fallback() -> None:
    """An attempt counts once the breaker admits it: a refused primary adds nothing."""
    clock = ManualClock()
    down, backup = Fake("down"), Fake("backup", fail=0)
    policies = {"retry": None, "breaker": {"fail_max": 1}, "fallback": ["backup"]}
    p = pipeline(clock, [down, backup], down=policies)
    route = p.routes["down"]
    for expected in (2, 1):  # the first trips the breaker, the second is refused by it
        info = StreamInfo()
        async with aclosing(p.stream(route, REQUEST, p.deadline(None), info)) as chunks:
            assert [c.data async for c in chunks] == [b"0", b"1", b"2"]
        assert (info.upstream, info.attempts) == ("backup", expected)
    assert down.hits == 1


async def test_failing_stream_close_still_releases_every_permit() -> None:
    """An upstream stream whose aclose raises still frees in_flight, the bulkhead slot, the
    breaker's probe and the rate-limit tokens."""
    clock = ManualClock()
    fake = Fake("u", fail=0)
    fake.close_raises = True
    p = pipeline(clock, [fake], u={
        "retry": None, "breaker": {"fail_max": 1, "half_open_probes": 1},
        "bulkhead": {"max_in_flight": 1, "max_queue": 0},
        "rate_limit": {"tokens_per_min": 1000, "mode": "reject"},
    })  # fmt: skip
    route = p.routes["u"]
    assert route.bulkhead is not None and route.breaker is not None
    info = StreamInfo()
    with pytest.raises(RuntimeError, match="aclose failed"):
        async with aclosing(p.stream(route, REQUEST, p.deadline(None), info)) as chunks:
            async for _ in chunks:
                break  # the caller goes away after the first chunk
    assert route.in_flight == 0 and route.bulkhead.in_flight == 0
    assert route.breaker._probes == 0 and route.breaker.failures == 0
    assert route.limiter is not None and route.limiter.tokens is not None
    assert route.limiter.tokens.available() == pytest.approx(1000, abs=1)


async def test_retry_after_beyond_backoff_max_ends_the_retries() -> None:
    """Without a deadline, a Retry-After longer than backoff_max_s is not waited for: the
    error returns at once with its delay for the caller."""
    clock = ManualClock()
    fake = Fake("u", retry_after_s=60.0)
    p = pipeline(clock, [fake], u={"retry": {**FAST, "backoff_max_s": 10.0}, "breaker": None})
    task = asyncio.ensure_future(p.call(p.routes["u"], REQUEST, p.deadline(None)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert task.done()
    with pytest.raises(errors.UpstreamUnavailableError) as info:
        task.result()
    assert info.value.retry_after_s == 60.0 and fake.hits == 1


async def test_retry_after_within_backoff_max_is_waited_for() -> None:
    """A Retry-After within backoff_max_s delays the retry by exactly that much."""
    clock = ManualClock()
    fake = Fake("u", fail=1, retry_after_s=0.5)
    p = pipeline(clock, [fake], u={"retry": {**FAST, "backoff_max_s": 1.0}, "breaker": None})
    task = asyncio.ensure_future(p.call(p.routes["u"], REQUEST, p.deadline(None)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert clock.sleepers == 1 and fake.hits == 1
    await clock.advance(0.49)
    assert fake.hits == 1 and not task.done()
    await clock.advance(0.01)
    result = await asyncio.wait_for(task, 1.0)
    assert result.attempts == 2 and fake.hits == 2


async def test_default_budget_gives_a_lone_call_on_a_dead_upstream_one_retry() -> None:
    """With the default retry policy (budget_min_retries 1), one call per window to a dead
    upstream makes 2 attempts, not max_attempts: (1 + ratio) x calls + 1."""
    clock = ManualClock()
    fake = Fake("u")
    p = pipeline(clock, [fake], u={"breaker": None})
    route = p.routes["u"]
    assert route.retrier is not None and route.retrier.policy.max_attempts == 4
    with pytest.raises(errors.UpstreamUnavailableError) as info:
        await drive(clock, p.call(route, REQUEST, p.deadline(None)), step_s=0.1)
    assert info.value.attempts == 2 and fake.hits == 2
