"""The caller's deadline on the policies' clock: remaining, expired, cap."""

from __future__ import annotations

import pytest

from sidecar.policies.clock import ManualClock
from sidecar.policies.deadline import Deadline


def test_after_sets_an_absolute_point() -> None:
    """`Deadline.after` is `timeout_s` from the clock's now, and does not move with it."""
    clock = ManualClock(start=500.0)
    deadline = Deadline.after(clock, 2.5)
    assert deadline.at == 502.5
    assert deadline.clock is clock


async def test_remaining_counts_down_and_never_goes_negative() -> None:
    """`remaining` shrinks as the clock advances and stops at 0."""
    clock = ManualClock()
    deadline = Deadline.after(clock, 2.0)
    assert deadline.remaining() == pytest.approx(2.0)
    await clock.advance(0.5)
    assert deadline.remaining() == pytest.approx(1.5)
    await clock.advance(1.5)
    assert deadline.remaining() == 0.0
    await clock.advance(10.0)
    assert deadline.remaining() == 0.0


async def test_expired_at_and_after_the_deadline() -> None:
    """`expired` is false before the deadline and true from the deadline on."""
    clock = ManualClock()
    deadline = Deadline.after(clock, 1.0)
    assert not deadline.expired()
    await clock.advance(0.875)
    assert not deadline.expired()
    await clock.advance(0.125)
    assert deadline.expired()
    await clock.advance(5.0)
    assert deadline.expired()


async def test_no_deadline() -> None:
    """Without a deadline nothing is left to count, nothing expires, nothing is capped."""
    clock = ManualClock()
    deadline = Deadline.after(clock, None)
    assert deadline.at is None
    assert deadline.remaining() is None
    await clock.advance(1e6)
    assert not deadline.expired()
    assert deadline.cap(42.0) == (42.0, False)


async def test_cap_by_time_left() -> None:
    """`cap` returns the time left, flagged, when it is shorter than the wait asked for."""
    clock = ManualClock()
    deadline = Deadline.after(clock, 3.0)
    assert deadline.cap(1.0) == (1.0, False)
    assert deadline.cap(5.0) == (pytest.approx(3.0), True)
    await clock.advance(2.5)
    assert deadline.cap(1.0) == (pytest.approx(0.5), True)
    assert deadline.cap(0.25) == (0.25, False)


async def test_cap_equal_to_time_left_is_not_capped() -> None:
    """A wait exactly as long as the time left is not reported as capped."""
    clock = ManualClock()
    deadline = Deadline.after(clock, 2.0)
    assert deadline.cap(2.0) == (2.0, False)


async def test_cap_after_expiry_is_zero() -> None:
    """Past the deadline every wait is capped to 0."""
    clock = ManualClock()
    deadline = Deadline.after(clock, 1.0)
    await clock.advance(3.0)
    assert deadline.cap(0.5) == (0.0, True)


def test_zero_timeout_is_already_expired() -> None:
    """A deadline of 0 s is expired at once with nothing left."""
    clock = ManualClock()
    deadline = Deadline.after(clock, 0.0)
    assert deadline.expired()
    assert deadline.remaining() == 0.0
    assert deadline.cap(1.0) == (0.0, True)
