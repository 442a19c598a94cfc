"""A call's whole budget (`policies.total_timeout_s`) and the retry of timeouts, on a manual
clock with the default numbers: a silent upstream costs two attempts (60 s each by default)
and the call ends at the 120 s budget; a caller's tighter deadline wins; a stream that keeps
delivering is never cut by the budget."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest

from sidecar import errors
from sidecar.config import DEFAULT_TIMEOUT_S, DEFAULT_TOTAL_TIMEOUT_S, parse_config
from sidecar.pipeline import Pipeline
from sidecar.policies.clock import ManualClock
from sidecar.routes import CallTrace, StreamInfo
from sidecar.upstreams.base import Chunk, UpstreamRequest, UpstreamResponse
from tests.unit.sidecar.test_pipeline import REQUEST, Fake, drive


class Silent(Fake):
    """Accepts every request and never answers (on the manual clock's time line)."""

    def __init__(self, name: str, clock: ManualClock) -> None:
        super().__init__(name)
        self.clock = clock
        self.started: list[float] = []
        self.cancelled = 0

    async def _hang(self) -> None:
        self.hits += 1
        self.started.append(self.clock.now())
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def call(self, request: UpstreamRequest) -> UpstreamResponse:
        await self._hang()
        raise AssertionError("unreachable")

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[Chunk]:
        await self._hang()
        yield Chunk(b"never")


class Steady(Fake):
    """Streams `count` chunks, one every `gap_s` of clock time."""

    def __init__(self, name: str, clock: ManualClock, count: int, gap_s: float) -> None:
        super().__init__(name, fail=0)
        self.clock, self.count, self.gap_s = clock, count, gap_s

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[Chunk]:
        for i in range(self.count):
            await self.clock.sleep(self.gap_s)
            yield Chunk(b"%d" % i)


def defaults(clock: ManualClock, fakes: list[Fake], **policies: Any) -> Pipeline:
    """Upstreams with the default policies (but a retry budget for single calls); the first
    one with `policies` too."""
    specs = {f.name: {"kind": "model", "type": "mock",
                      "policies": {"retry": {"budget_min_retries": 10},
                                   **(policies if f is fakes[0] else {})}}
             for f in fakes}  # fmt: skip
    return Pipeline(parse_config({"upstreams": specs}), {f.name: f for f in fakes}, clock)


def test_the_defaults_are_the_documented_ones() -> None:
    """60 s per attempt, 120 s a call, one retry after a timeout."""
    config = parse_config({"upstreams": {"m": {"kind": "model", "type": "mock"}}})
    policies = config.upstreams["m"].policies
    assert (DEFAULT_TIMEOUT_S, DEFAULT_TOTAL_TIMEOUT_S) == (60.0, 120.0)
    assert policies.total_timeout_s == 120.0
    assert policies.retry is not None and policies.retry.timeout_retries == 1


async def test_a_silent_upstream_costs_two_attempts_and_the_budget() -> None:
    """No fallback, default config: the first attempt times out at 60 s, is retried once, and
    the call ends at the 120 s budget with a timeout error carrying 2 attempts (the budget's
    cut is the upstream's own timeout, not the caller's); each attempt's request was
    cancelled."""
    clock = ManualClock()
    silent = Silent("u", clock)
    p = defaults(clock, [silent])
    route = p.routes["u"]
    started = clock.now()
    trace = CallTrace()
    with pytest.raises(errors.UpstreamTimeoutError) as info:
        await drive(clock, p.call(route, REQUEST, p.deadline(None, route.plan.budget_s), trace),
                    step_s=0.05)  # fmt: skip
    assert clock.now() - started == pytest.approx(120.0, abs=0.2)  # drive's steps
    assert not info.value.caller_deadline and info.value.attempts == 2
    assert silent.started[0] - started <= 0.05 and silent.started[1] - started >= 60.0
    assert silent.hits == 2 and silent.cancelled == 2


async def test_timeouts_are_retried_at_most_timeout_retries_times() -> None:
    """With a 600 s budget and 4 attempts allowed, a silent upstream still gets only 1 + 1
    attempts (ending at its own second timeout); `timeout_retries: 0` makes it one."""
    for timeout_retries, attempts in ((1, 2), (0, 1)):
        clock = ManualClock()
        silent = Silent("u", clock)
        retry = {"budget_min_retries": 10, "timeout_retries": timeout_retries}
        p = defaults(clock, [silent], total_timeout_s=600, retry=retry)
        route = p.routes["u"]
        with pytest.raises(errors.UpstreamTimeoutError) as info:
            await drive(clock, p.call(route, REQUEST, p.deadline(None, 600)), step_s=0.05)
        assert not info.value.caller_deadline and info.value.attempts == attempts
        assert silent.hits == attempts


async def test_the_callers_tighter_deadline_wins() -> None:
    """A caller's 5 s deadline under a 120 s budget: one attempt, cut at 5 s."""
    clock = ManualClock()
    silent = Silent("u", clock)
    p = defaults(clock, [silent])
    route = p.routes["u"]
    started = clock.now()
    with pytest.raises(errors.UpstreamTimeoutError) as info:
        await drive(clock, p.call(route, REQUEST, p.deadline(5.0, route.plan.budget_s)))
    assert clock.now() - started == pytest.approx(5.0, abs=0.05)
    assert info.value.caller_deadline and silent.hits == 1


async def test_a_silent_primary_fails_over_once_and_the_fallback_gets_the_rest() -> None:
    """With a fallback, a timeout is not retried: the backup gets the call at 60 s, within
    the same 120 s budget, and answers."""
    clock = ManualClock()
    silent, backup = Silent("u", clock), Fake("b", fail=0)
    p = defaults(clock, [silent, backup], fallback=["b"])
    route = p.routes["u"]
    started = clock.now()
    result = await drive(clock, p.call(route, REQUEST, p.deadline(None, route.plan.budget_s)))
    assert result.upstream == "b" and result.attempts == 2
    assert clock.now() - started == pytest.approx(60.0, abs=0.05)
    assert (silent.hits, backup.hits) == (1, 1)


async def test_a_stream_that_keeps_delivering_outlives_the_budget() -> None:
    """The budget bounds getting a stream flowing, not a healthy stream: 30 chunks 10 s apart
    (300 s, gaps under the 60 s idle bound) arrive whole under the 120 s budget."""
    clock = ManualClock()
    steady = Steady("u", clock, count=30, gap_s=10.0)
    p = defaults(clock, [steady])
    route = p.routes["u"]
    info = StreamInfo()

    async def read() -> list[bytes]:
        opening = p.deadline(None, route.plan.budget_s)
        chunks = p.stream(route, REQUEST, p.deadline(None), info, route.plan, opening)
        async with aclosing(chunks) as stream:
            return [chunk.data async for chunk in stream]

    assert len(await drive(clock, read(), step_s=1.0)) == 30
    assert info.attempts == 1


async def test_a_silent_stream_ends_at_the_budget() -> None:
    """A stream whose first chunk never comes: two attempts, ended at the 120 s budget."""
    clock = ManualClock()
    silent = Silent("u", clock)
    p = defaults(clock, [silent])
    route = p.routes["u"]
    info = StreamInfo()
    started = clock.now()

    async def read() -> None:
        opening = p.deadline(None, route.plan.budget_s)
        chunks = p.stream(route, REQUEST, p.deadline(None), info, route.plan, opening)
        async with aclosing(chunks) as stream:
            async for _ in stream:
                pass

    with pytest.raises(errors.UpstreamTimeoutError) as caught:
        await drive(clock, read(), step_s=0.05)
    assert clock.now() - started == pytest.approx(120.0, abs=0.2)
    assert not caught.value.caller_deadline and info.attempts == 2 and silent.cancelled == 2


async def test_a_budget_no_longer_than_an_attempt_counts_against_the_upstream() -> None:
    """A 60 s budget with 60 s attempts leaves no time for the fallback: the silent primary's
    cut is its own timeout, so its breaker opens, and the next call goes to the backup."""
    clock = ManualClock()
    silent, backup = Silent("u", clock), Fake("b", fail=0)
    p = defaults(clock, [silent, backup], fallback=["b"], total_timeout_s=60,
                 breaker={"fail_max": 1, "reset_timeout_s": 600})  # fmt: skip
    route = p.routes["u"]
    with pytest.raises(errors.UpstreamTimeoutError) as info:
        await drive(clock, p.call(route, REQUEST, p.deadline(None, route.plan.budget_s)))
    assert not info.value.caller_deadline
    assert route.breaker is not None and route.breaker.state == "open"
    result = await drive(clock, p.call(route, REQUEST, p.deadline(None, route.plan.budget_s)))
    assert result.upstream == "b" and (silent.hits, backup.hits) == (1, 1)
