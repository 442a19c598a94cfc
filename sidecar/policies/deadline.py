"""The caller's deadline, as one absolute point on the policies' clock.

Every wait in the pipeline (rate-limit queue, bulkhead queue, backoff, each attempt) is capped
by what is left of it; a retry is never started, nor a wait begun, past it.
"""

from __future__ import annotations

from sidecar.policies.clock import Clock


class Deadline:
    """An absolute deadline (`at`, on `clock`), or none when the caller set no deadline."""

    __slots__ = ("at", "clock")

    def __init__(self, clock: Clock, at: float | None) -> None:
        self.clock = clock
        self.at = at

    @classmethod
    def after(cls, clock: Clock, timeout_s: float | None) -> Deadline:
        """The deadline `timeout_s` from now (none when `timeout_s` is None)."""
        return cls(clock, None if timeout_s is None else clock.now() + timeout_s)

    def remaining(self) -> float | None:
        """Seconds left (never negative), or None without a deadline."""
        return None if self.at is None else max(0.0, self.at - self.clock.now())

    def expired(self) -> bool:
        return self.at is not None and self.clock.now() >= self.at

    def cap(self, seconds: float) -> tuple[float, bool]:
        """`seconds` capped by the time left, and whether the deadline is what capped it."""
        left = self.remaining()
        if left is not None and left < seconds:
            return left, True
        return seconds, False
