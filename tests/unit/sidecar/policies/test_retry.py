"""Retries: which failures, how long to wait, and the budget that bounds them."""

from __future__ import annotations

import random
from typing import Any

import pytest

from sidecar import errors
from sidecar.config import RetryPolicy
from sidecar.policies.clock import ManualClock
from sidecar.policies.retry import Retrier, RetryBudget

UP = "llm"


def retrier(clock: ManualClock | None = None, *, idempotent: bool = True, **policy: Any) -> Retrier:
    rng = policy.pop("rng", None)
    return Retrier(
        UP, RetryPolicy(**policy), clock or ManualClock(), idempotent=idempotent, rng=rng
    )


def unavailable(status: int = 0, retry_after_s: float | None = None) -> errors.UpstreamError:
    return errors.UpstreamUnavailableError(
        "down", upstream=UP, http_status=status, retry_after_s=retry_after_s
    )


def client(status: int, retry_after_s: float | None = None) -> errors.UpstreamClientError:
    return errors.UpstreamClientError(
        "refused", upstream=UP, http_status=status, retry_after_s=retry_after_s
    )


def test_unavailable_without_status_is_retryable() -> None:
    """`unavailable`: a refused or reset connection (no HTTP status) is retried."""
    assert retrier().retryable(unavailable())


def test_upstream_timeout_is_retryable() -> None:
    """`deadline`: the upstream's own per-attempt timeout is retried."""
    assert retrier().retryable(errors.UpstreamTimeoutError("slow", upstream=UP))


def test_caller_deadline_timeout_is_not_retryable() -> None:
    """A timeout cut by the caller's deadline is never retried."""
    exc = errors.UpstreamTimeoutError("slow", upstream=UP, caller_deadline=True)
    assert not retrier().retryable(exc)


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_listed_5xx_are_retryable(status: int) -> None:
    """500, 502, 503 and 504 are retried by status."""
    assert retrier().retryable(unavailable(status))


def test_429_is_retryable() -> None:
    """429 (a client error class) is retried because it is listed."""
    assert retrier().retryable(client(429))


@pytest.mark.parametrize("status", [400, 401, 404, 408, 422])
def test_unlisted_4xx_are_not_retryable(status: int) -> None:
    """400 and other unlisted 4xx are not retried."""
    assert not retrier().retryable(client(status))


def test_unlisted_5xx_is_not_retryable() -> None:
    """A 5xx not in `retry_on` (501) is not retried, although it is `unavailable`."""
    assert not retrier().retryable(unavailable(501))


def test_bad_response_only_when_listed() -> None:
    """`bad_response` is off by default and retried once listed."""
    exc = errors.UpstreamBadResponseError("garbage", upstream=UP)
    assert not retrier().retryable(exc)
    assert retrier(retry_on=["bad_response"]).retryable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        ValueError("bug"),
        errors.CircuitOpenError("open", upstream=UP),
        errors.RateLimitedError("limited", upstream=UP),
        errors.InvalidRequestError("bad"),
    ],
)
def test_non_upstream_errors_are_not_retryable(exc: Exception) -> None:
    """Anything that is not an UpstreamError is never retried."""
    assert not retrier().retryable(exc)


def test_custom_retry_on_narrows() -> None:
    """With `retry_on: [503]` only 503 is retried, not 500 nor a reset connection."""
    r = retrier(retry_on=[503])
    assert r.retryable(unavailable(503))
    assert not r.retryable(unavailable(500))
    assert not r.retryable(unavailable())


def test_enabled_only_for_idempotent_and_several_attempts() -> None:
    """Retries are off for non-idempotent tools and for max_attempts 1."""
    assert retrier().enabled
    assert not retrier(idempotent=False).enabled
    assert not retrier(max_attempts=1).enabled


def test_full_jitter_stays_within_the_exponential_ceiling() -> None:
    """Full jitter draws in [0, min(max, initial*2^(n-1))], the same draws as the rng."""
    r = retrier(backoff_initial_s=0.2, backoff_max_s=1.0, rng=random.Random(7))
    expected = random.Random(7)
    for attempt in range(1, 9):
        ceiling = min(1.0, 0.2 * 2 ** (attempt - 1))
        for _ in range(50):
            delay = r.backoff_s(attempt)
            assert 0.0 <= delay <= ceiling
            assert delay == expected.uniform(0.0, ceiling)


def test_full_jitter_spreads_over_the_range() -> None:
    """Full jitter is not a constant: draws cover most of [0, ceiling]."""
    r = retrier(backoff_initial_s=1.0, backoff_max_s=100.0, rng=random.Random(1))
    draws = [r.backoff_s(3) for _ in range(200)]
    assert min(draws) < 0.5 and max(draws) > 3.5
    assert all(0.0 <= d <= 4.0 for d in draws)


def test_no_jitter_is_exact_exponential_with_a_cap() -> None:
    """With jitter none the backoff is initial*2^(n-1), capped at backoff_max_s."""
    r = retrier(jitter="none", backoff_initial_s=0.2, backoff_max_s=1.0)
    assert [r.backoff_s(n) for n in range(1, 6)] == pytest.approx([0.2, 0.4, 0.8, 1.0, 1.0])


def test_retry_after_is_a_floor() -> None:
    """`delay_s` is never shorter than the upstream's Retry-After, nor than the backoff."""
    r = retrier(jitter="none", backoff_initial_s=0.5, backoff_max_s=10.0)
    assert r.delay_s(client(429, retry_after_s=3.0), 1) == 3.0
    assert r.delay_s(unavailable(503, retry_after_s=0.1), 3) == pytest.approx(2.0)
    assert r.delay_s(unavailable(503), 2) == pytest.approx(1.0)
    jittered = retrier(backoff_initial_s=0.5, rng=random.Random(3))
    delays = [jittered.delay_s(client(429, retry_after_s=0.4), 1) for _ in range(50)]
    assert all(0.4 <= d <= 0.5 for d in delays)
    assert min(delays) == 0.4 and max(delays) > 0.4  # the backoff still counts above the floor


def test_budget_ratio_bounds_retries() -> None:
    """Ratio 0.2, no minimum: after 100 calls exactly 20 retries are allowed, no more."""
    budget = RetryBudget(0.2, 0, 10, ManualClock())
    assert not budget.try_spend()
    for _ in range(100):
        budget.record_call()
    assert budget.left() == pytest.approx(20.0)
    spent = sum(budget.try_spend() for _ in range(50))
    assert spent == 20
    assert budget.exhausted == 31
    assert budget.left() == pytest.approx(0.0)


def test_budget_min_retries_without_calls() -> None:
    """`min_retries` lets a quiet upstream retry without any recorded call."""
    budget = RetryBudget(0.2, 3, 10, ManualClock())
    assert budget.left() == 3.0
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
    assert budget.exhausted == 1


async def test_budget_window_slides() -> None:
    """Calls and retries older than `window_s` stop counting."""
    clock = ManualClock(start=1000.0)
    budget = RetryBudget(0.5, 0, 10, clock)
    for _ in range(10):
        budget.record_call()
    assert budget.try_spend() and budget.try_spend()
    assert budget.left() == pytest.approx(3.0)
    await clock.advance(5.0)
    for _ in range(4):
        budget.record_call()
    assert budget.left() == pytest.approx(5.0)  # 14 calls, 2 retries
    await clock.advance(5.0)  # the first second has left the 10 s window
    assert budget.left() == pytest.approx(2.0)  # 4 calls, no retries
    await clock.advance(4.5)
    assert budget.left() == pytest.approx(2.0)
    await clock.advance(0.5)
    assert budget.left() == 0.0


async def test_budget_slot_reuse_forgets_old_counts() -> None:
    """A one-second slot reused a window later starts from zero."""
    clock = ManualClock(start=1000.0)
    budget = RetryBudget(1.0, 0, 2, clock)
    for _ in range(5):
        budget.record_call()
    await clock.advance(2.0)  # same slot (1002 % 2 == 1000 % 2), a new second
    budget.record_call()
    assert budget.left() == 1.0


def test_retrier_status_and_budget_from_policy() -> None:
    """The retrier's budget follows the policy, and `status` reports it."""
    r = retrier(budget_ratio=0.5, budget_min_retries=1, budget_window_s=30)
    for _ in range(4):
        r.budget.record_call()
    assert r.status() == {
        "retry.retries": 0.0,
        "retry.budget_left": 3.0,
        "retry.budget_exhausted": 0.0,
    }
    for _ in range(4):
        r.budget.try_spend()
    assert r.status()["retry.budget_exhausted"] == 1.0
    assert r.status()["retry.budget_left"] == 0.0


def test_retry_after_beyond_backoff_max_means_no_retry() -> None:
    """A Retry-After longer than backoff_max_s is not slept: `delay_s` is None."""
    r = retrier(jitter="none", backoff_initial_s=0.5, backoff_max_s=10.0)
    assert r.delay_s(unavailable(503, retry_after_s=10.5), 1) is None
    assert r.delay_s(client(429, retry_after_s=10.0), 1) == 10.0


def test_default_budget_minimum_is_one_retry_per_window() -> None:
    """The default budget lets a quiet upstream retry once per window, not max_attempts - 1
    times: (1 + ratio) x calls + 1 attempts per window at most."""
    r = retrier()
    assert r.policy.budget_min_retries == 1
    r.budget.record_call()
    assert r.budget.try_spend() and not r.budget.try_spend()
