"""The circuit breaker: pybreaker's state machine on a manual clock, plus probes and NEUTRAL."""

from __future__ import annotations

import asyncio
from typing import Any

import pybreaker
import pytest

from sidecar import errors
from sidecar.config import BreakerPolicy
from sidecar.policies.base import NEUTRAL, SUCCESS, Outcome, Verdict, outcome_of
from sidecar.policies.breaker import PROBE_RETRY_S, Breaker, BreakerPermit
from sidecar.policies.clock import ManualClock

UP = "llm"
FAILURE = Outcome(Verdict.FAILURE, errors.UpstreamUnavailableError("down", upstream=UP))


def breaker(clock: ManualClock, **policy: Any) -> Breaker:
    policy.setdefault("fail_max", 3)
    policy.setdefault("reset_timeout_s", 30.0)
    return Breaker(UP, BreakerPolicy(**policy), clock)


def fail(b: Breaker, times: int = 1) -> None:
    for _ in range(times):
        b.admit().release(FAILURE)


def pb_state(b: Breaker) -> str:
    return b._cb.state.name  # pybreaker's own (cached) state object


def tripped(clock: ManualClock, **policy: Any) -> Breaker:
    b = breaker(clock, **policy)
    fail(b, b.policy.fail_max)
    assert b.state == "open"
    return b


async def test_trips_after_fail_max_consecutive_failures() -> None:
    """The breaker stays closed for fail_max - 1 failures and opens on the fail_max-th."""
    b = breaker(ManualClock(), fail_max=3)
    fail(b, 2)
    assert b.state == "closed" and b.failures == 2
    assert b.status() == {
        "breaker.failures": 2.0,
        "breaker.transitions": 0.0,
        "breaker.rejected": 0.0,
        "breaker.open_for_s": 0.0,
    }
    fail(b)
    assert b.state == "open" and pb_state(b) == pybreaker.STATE_OPEN


async def test_open_rejects_at_once_with_time_left() -> None:
    """While open every admit fails fast; retry_after_s is what is left of reset_timeout_s."""
    clock = ManualClock()
    b = tripped(clock, reset_timeout_s=30.0)
    with pytest.raises(errors.CircuitOpenError) as info:
        b.admit()
    assert info.value.retry_after_s == pytest.approx(30.0)
    assert info.value.upstream == UP
    await clock.advance(12.5)
    with pytest.raises(errors.CircuitOpenError) as info:
        b.admit()
    assert info.value.retry_after_s == pytest.approx(17.5)
    assert b.rejected == 2
    assert b.status()["breaker.open_for_s"] == pytest.approx(17.5)
    assert b.state == "open"


async def test_after_reset_timeout_next_admit_is_a_probe() -> None:
    """Once reset_timeout_s has passed the next admit goes half-open as a probe."""
    clock = ManualClock()
    b = tripped(clock, reset_timeout_s=30.0)
    await clock.advance(29.75)
    with pytest.raises(errors.CircuitOpenError):
        b.admit()
    await clock.advance(0.25)
    permit = b.admit()
    assert b.state == "half_open" and pb_state(b) == pybreaker.STATE_HALF_OPEN
    assert b._probes == 1
    permit.release(SUCCESS)
    assert b.state == "closed" and b._probes == 0 and b.failures == 0
    fail(b, 2)
    assert b.state == "closed"  # a full fail_max is needed to trip again


async def test_half_open_admits_at_most_the_probe_count() -> None:
    """While half-open at most half_open_probes attempts are in flight; the rest fail fast."""
    clock = ManualClock()
    b = tripped(clock, half_open_probes=2, success_threshold=3)
    await clock.advance(30.0)
    probes = [b.admit(), b.admit()]
    for _ in range(10):
        with pytest.raises(errors.CircuitOpenError) as info:
            b.admit()
        assert info.value.retry_after_s == PROBE_RETRY_S
    probes[0].release(SUCCESS)  # a slot frees up, the breaker is still half-open
    assert b.state == "half_open"
    probes.append(b.admit())
    with pytest.raises(errors.CircuitOpenError):
        b.admit()
    assert b.rejected == 11 and b._probes == 2
    for permit in probes[1:]:
        permit.release(SUCCESS)
    assert b.state == "closed" and b._probes == 0


async def test_success_threshold_needs_that_many_probe_successes() -> None:
    """With success_threshold 2 one probe success keeps it half-open; the second closes it."""
    clock = ManualClock()
    b = tripped(clock, success_threshold=2)
    await clock.advance(30.0)
    b.admit().release(SUCCESS)
    assert b.state == "half_open"
    assert b._cb.success_counter == 1
    b.admit().release(SUCCESS)
    assert b.state == "closed"


async def test_probe_failure_reopens_for_a_full_timeout() -> None:
    """A failed probe re-opens the breaker, and the reset timeout starts again."""
    clock = ManualClock()
    b = tripped(clock, success_threshold=2)
    await clock.advance(30.0)
    b.admit().release(SUCCESS)
    b.admit().release(FAILURE)
    assert b.state == "open" and pb_state(b) == pybreaker.STATE_OPEN
    with pytest.raises(errors.CircuitOpenError) as info:
        b.admit()
    assert info.value.retry_after_s == pytest.approx(30.0)
    await clock.advance(30.0)
    b.admit().release(SUCCESS)
    assert b.state == "half_open"  # the success before the re-open no longer counts


async def test_neutral_does_not_count_as_failure() -> None:
    """NEUTRAL outcomes (refusals, cancellation) leave the failure count alone."""
    b = breaker(ManualClock(), fail_max=3)
    fail(b, 2)
    for exc in (
        errors.RateLimitedError("x", upstream=UP),
        errors.OverloadedError("x", upstream=UP),
        errors.UpstreamTimeoutError("x", upstream=UP, caller_deadline=True),
        asyncio.CancelledError(),
    ):
        b.admit().release(outcome_of(exc))
    b.admit().release(NEUTRAL)
    assert b.failures == 2 and b.state == "closed"
    fail(b)
    assert b.state == "open"  # NEUTRAL did not reset the count either


async def test_neutral_probe_neither_closes_nor_reopens() -> None:
    """A NEUTRAL probe outcome leaves the breaker half-open and frees its probe slot."""
    clock = ManualClock()
    b = tripped(clock)
    await clock.advance(30.0)
    b.admit().release(NEUTRAL)
    assert b.state == "half_open" and b._probes == 0
    assert b._cb.success_counter == 0
    b.admit().release(SUCCESS)
    assert b.state == "closed"


async def test_success_resets_consecutive_failures() -> None:
    """A success (a caller-caused 4xx included) resets the count: failures are consecutive."""
    b = breaker(ManualClock(), fail_max=3)
    for _ in range(5):
        fail(b, 2)
        b.admit().release(SUCCESS)
        assert b.failures == 0
    assert b.state == "closed"
    fail(b)  # a 400 is an answer and resets the count too; a 429 is a failure
    b.admit().release(outcome_of(errors.UpstreamClientError("x", upstream=UP, http_status=400)))
    assert b.failures == 0
    b.admit().release(outcome_of(errors.UpstreamClientError("x", upstream=UP, http_status=429)))
    assert b.failures == 1


async def test_transitions_are_counted() -> None:
    """closed -> open -> half_open -> open -> half_open -> closed are five transitions."""
    clock = ManualClock()
    b = tripped(clock)
    assert b.transitions == 1
    await clock.advance(30.0)
    b.admit().release(FAILURE)
    assert b.transitions == 3
    await clock.advance(30.0)
    b.admit().release(SUCCESS)
    assert b.transitions == 5
    assert b.status()["breaker.transitions"] == 5.0
    assert b.status()["breaker.open_for_s"] == 0.0


async def test_late_failures_of_a_tripped_breaker_do_not_rearm_it() -> None:
    """Attempts admitted before the trip that fail afterwards neither re-open nor count."""
    clock = ManualClock()
    b = breaker(clock, fail_max=2)
    late = [b.admit() for _ in range(4)]
    late[0].release(FAILURE)
    late[1].release(FAILURE)
    assert b.state == "open" and b.transitions == 1
    await clock.advance(10.0)
    late[2].release(FAILURE)
    late[3].release(FAILURE)
    assert b.transitions == 1
    with pytest.raises(errors.CircuitOpenError) as info:
        b.admit()
    assert info.value.retry_after_s == pytest.approx(20.0)


async def test_late_probe_success_does_not_close_a_reopened_breaker() -> None:
    """With two probes, one failing re-opens; the other's later success cannot close it."""
    clock = ManualClock()
    b = tripped(clock, half_open_probes=2)
    await clock.advance(30.0)
    first, second = b.admit(), b.admit()
    first.release(FAILURE)
    assert b.state == "open"
    second.release(SUCCESS)
    assert b.state == "open" and pb_state(b) == pybreaker.STATE_OPEN
    with pytest.raises(errors.CircuitOpenError):
        b.admit()


async def test_failure_while_closed_admitted_before_probe_does_not_reopen() -> None:
    """An attempt admitted while closed cannot re-open a half-open breaker by failing late."""
    clock = ManualClock()
    b = breaker(clock, fail_max=1)
    early = b.admit()
    fail(b)
    await clock.advance(30.0)
    probe = b.admit()
    early.release(FAILURE)
    assert b.state == "half_open"
    probe.release(SUCCESS)
    assert b.state == "closed"


async def test_releasing_a_permit_twice_counts_once() -> None:
    """A permit released twice neither double-counts nor frees a second probe slot."""
    clock = ManualClock()
    b = breaker(clock, fail_max=2)
    permit = b.admit()
    assert isinstance(permit, BreakerPermit)
    permit.release(FAILURE)
    permit.release(FAILURE)
    assert b.failures == 1 and b.state == "closed"
    fail(b)
    await clock.advance(30.0)
    probe = b.admit()
    probe.release(NEUTRAL)
    probe.release(NEUTRAL)
    assert b._probes == 0
    second = b.admit()
    with pytest.raises(errors.CircuitOpenError):
        b.admit()  # still only one probe at a time
    second.release(SUCCESS)
    second.release(FAILURE)
    assert b.state == "closed" and b.failures == 0


async def test_stale_probe_takes_no_slot_in_the_next_half_open_window() -> None:
    """A probe still in flight when its half-open window ended (another probe failed) does
    not hold a slot of the next window, nor free one when it finally ends."""
    clock = ManualClock()
    b = tripped(clock, fail_max=1, half_open_probes=2)
    await clock.advance(30.0)
    failing, stale = b.admit(), b.admit()
    failing.release(FAILURE)  # re-opens: a new epoch
    assert b.state == "open" and b._probes == 0
    await clock.advance(30.0)
    window = [b.admit(), b.admit()]  # both slots of the new window are free
    assert b.state == "half_open" and b._probes == 2
    stale.release(SUCCESS)  # late, from the old window: frees nothing, closes nothing
    assert b._probes == 2 and b.state == "half_open"
    with pytest.raises(errors.CircuitOpenError):
        b.admit()
    window[0].release(SUCCESS)
    assert b.state == "closed" and b._probes == 0
    window[1].release(SUCCESS)
    assert b._probes == 0


async def test_refuses_tells_whether_an_attempt_would_be_refused() -> None:
    """`refuses(within_s)`: open with more than within_s left, or half-open with its probes
    taken; it changes nothing."""
    clock = ManualClock()
    b = breaker(clock, fail_max=1, reset_timeout_s=10.0)
    assert not b.refuses()
    fail(b)
    assert b.refuses() and b.refuses(9.9) and not b.refuses(10.0)
    assert b.rejected == 0 and b.state == "open"
    await clock.advance(10.0)
    assert not b.refuses()
    probe = b.admit()
    assert b.refuses()  # half-open, its one probe in flight
    probe.release(SUCCESS)
    assert not b.refuses() and b.state == "closed"
