"""The caller's deadline, as one absolute point on the policies' clock.

Every wait in the pipeline (rate-limit queue, bulkhead queue, backoff, each attempt) is capped
by what is left of it; a retry is never started, nor a wait begun, past it.
"""

from __future__ import annotations

from sidecar.policies.clock import Clock


def tighter(one: float | None, other: float | None) -> float | None:
    """The shorter of two optional bounds in seconds (None: no bound)."""
    if one is None:
        return other
    return one if other is None or one < other else other


class Deadline:
    """An absolute deadline (`at`, on `clock`), or none when the caller set no deadline;
    `caller`: whether it is the caller's own (else the call's budget, `total_timeout_s`: an
    attempt it cuts is the upstream's timeout, counted against it)."""

    __slots__ = ("at", "caller", "clock")

    def __init__(self, clock: Clock, at: float | None, caller: bool = True) -> None:
        self.clock = clock
        self.at = at
        self.caller = caller

    @classmethod
    def after(cls, clock: Clock, timeout_s: float | None) -> Deadline:
        """The deadline `timeout_s` from now (none when `timeout_s` is None)."""
        return cls(clock, None if timeout_s is None else clock.now() + timeout_s)

    @classmethod
    def within(cls, clock: Clock, timeout_s: float | None, budget_s: float | None) -> Deadline:
        """The caller's deadline (`timeout_s` from now), or the budget's when the caller set
        none or a later one."""
        if budget_s is not None and (timeout_s is None or budget_s < timeout_s):
            return cls(clock, clock.now() + budget_s, caller=False)
        return cls.after(clock, timeout_s)

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None without a deadline."""
        return None if self.at is None else max(0.0, self.at - self.clock.now())

    def expired(self) -> bool:
        return self.at is not None and self.clock.now() >= self.at

    def cap(self, seconds: float) -> tuple[float, bool]:
        """`seconds` capped by the time left, and whether the caller's deadline is what
        capped it (a budget's cut is the upstream's own timeout)."""
        left = self.remaining()
        if left is not None and left < seconds:
            return left, self.caller
        return seconds, False
