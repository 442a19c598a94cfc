"""Retries: which failures, how long to wait, and a budget so retries never pile up.

Backoff is exponential with full jitter (a uniform draw in [0, min(max, initial * 2^n)]);
an upstream's `Retry-After` is a floor, and one longer than `backoff_max_s` ends the retries
(the error, with its Retry-After, goes back to the caller instead of a long silent wait). The
budget is per upstream: over a sliding window, retries may add at most `budget_ratio` of the
calls plus `budget_min_retries` (so a quiet upstream can still retry once in a while). A
failing upstream thus receives at most (1 + budget_ratio) x calls + budget_min_retries
attempts per window, never max_attempts x.
"""

from __future__ import annotations

import random

from sidecar import errors
from sidecar.config import RetryPolicy
from sidecar.policies.clock import Clock

# Conditions for failures that carry no HTTP status.
CONDITIONS: dict[str, type[errors.UpstreamError]] = {
    "unavailable": errors.UpstreamUnavailableError,
    "deadline": errors.UpstreamTimeoutError,
    "bad_response": errors.UpstreamBadResponseError,
}


class RetryBudget:
    """Calls and retries over a sliding window of one-second buckets."""

    def __init__(self, ratio: float, min_retries: int, window_s: int, clock: Clock) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self._clock = clock
        self._window = max(1, window_s)
        self._seconds = [-1] * self._window
        self._calls = [0] * self._window
        self._retries = [0] * self._window
        self.exhausted = 0

    def _slot(self) -> int:
        second = int(self._clock.now())
        slot = second % self._window
        if self._seconds[slot] != second:
            self._seconds[slot], self._calls[slot], self._retries[slot] = second, 0, 0
        return slot

    def _totals(self) -> tuple[int, int]:
        oldest = int(self._clock.now()) - self._window
        calls = retries = 0
        for i, second in enumerate(self._seconds):
            if second > oldest:
                calls += self._calls[i]
                retries += self._retries[i]
        return calls, retries

    def record_call(self) -> None:
        self._calls[self._slot()] += 1

    def left(self) -> float:
        """Retries the budget allows now."""
        calls, retries = self._totals()
        return max(0.0, self.ratio * calls + self.min_retries - retries)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        if self.left() < 1:
            self.exhausted += 1
            return False
        self._retries[self._slot()] += 1
        return True


class Retrier:
    """Decides whether and when to retry one upstream's failed attempts."""

    def __init__(
        self,
        upstream: str,
        policy: RetryPolicy,
        clock: Clock,
        *,
        idempotent: bool,
        rng: random.Random | None = None,
    ) -> None:
        self.upstream = upstream
        self.policy = policy
        self.enabled = idempotent and policy.max_attempts > 1
        self.retries = 0
        self.budget = RetryBudget(
            policy.budget_ratio, policy.budget_min_retries, int(policy.budget_window_s), clock
        )
        self._rng = rng or random.Random()
        self._statuses = {c for c in policy.retry_on if isinstance(c, int)}
        self._kinds = tuple(CONDITIONS[c] for c in policy.retry_on if isinstance(c, str))

    def retryable(self, exc: BaseException) -> bool:
        """Whether `exc` is a failure this policy retries."""
        if not isinstance(exc, errors.UpstreamError):
            return False
        if isinstance(exc, errors.UpstreamTimeoutError) and exc.caller_deadline:
            return False  # the caller's time is up: a retry cannot help
        if exc.http_status:
            return exc.http_status in self._statuses
        return isinstance(exc, self._kinds)

    def backoff_s(self, attempt: int) -> float:
        """The wait before attempt `attempt + 1` (attempt counts from 1)."""
        growth: float = 2.0 ** (attempt - 1)
        ceiling = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * growth)
        if self.policy.jitter == "full":
            return self._rng.uniform(0.0, ceiling)
        return ceiling

    def delay_s(self, exc: BaseException, attempt: int) -> float | None:
        """Backoff, but never sooner than the upstream's Retry-After; None (do not retry)
        when that Retry-After is longer than `backoff_max_s`."""
        retry_after: float | None = getattr(exc, "retry_after_s", None)
        if retry_after is not None and retry_after > self.policy.backoff_max_s:
            return None
        return max(self.backoff_s(attempt), retry_after or 0.0)

    def status(self) -> dict[str, float]:
        return {
            "retry.retries": float(self.retries),
            "retry.budget_left": self.budget.left(),
            "retry.budget_exhausted": float(self.budget.exhausted),
        }
