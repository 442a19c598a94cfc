"""Rate limits: GCRA buckets for requests and tokens, modes wait and reject, token settling."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar import errors, status
from sidecar.config import RateLimitPolicy
from sidecar.policies.base import SUCCESS, Outcome, Verdict
from sidecar.policies.clock import ManualClock
from sidecar.policies.deadline import Deadline
from sidecar.policies.ratelimit import (
    DEFAULT_OUTPUT_TOKENS,
    Bucket,
    RateLimiter,
    _Denied,
    estimate_tokens,
)
from sidecar.upstreams.base import Usage

UP = "llm"
FAILED = Outcome(Verdict.FAILURE, errors.UpstreamUnavailableError("down", upstream=UP))


def limiter(clock: ManualClock, **policy: Any) -> RateLimiter:
    return RateLimiter(UP, RateLimitPolicy(**policy), clock)


def no_deadline(clock: ManualClock) -> Deadline:
    return Deadline(clock, None)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize("start", [0.0, 1000.0, 12345.678, 8_640_000.0])
async def test_bucket_burst_then_rate(start: float) -> None:
    """A bucket gives `burst` units at once (float drift or not), then one every 1/rate s."""
    clock = ManualClock(start)
    bucket = Bucket(10.0, 5.0, clock)
    assert bucket.available() == pytest.approx(5.0)
    assert [bucket.reserve(1, 0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.available() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(_Denied) as info:
        bucket.reserve(1, 0.0)
    assert info.value.wait_s == pytest.approx(0.1)
    await clock.advance(0.25)
    assert bucket.available() == pytest.approx(2.5)
    assert bucket.reserve(2, 0.0) == 0.0
    assert bucket.reserve(1, 1.0) == pytest.approx(0.05)  # reserved in the future


async def test_unthrottled_caller_gets_burst_plus_rate_over_three_seconds() -> None:
    """Over 3 simulated seconds an unthrottled caller in reject mode gets B + 3R (within 1)."""
    clock = ManualClock()
    rate, burst = 10.0, 20.0
    rl = limiter(clock, requests_per_s=rate, burst=burst, mode="reject")
    admitted = 0
    for _ in range(3001):  # every millisecond from t=0 to t=3 s
        while True:
            try:
                await rl.admit(0, no_deadline(clock))
            except errors.RateLimitedError:
                break
            admitted += 1
        await clock.advance(0.001)
    assert abs(admitted - (burst + 3 * rate)) <= 1
    assert rl.waited_s == 0.0 and clock.sleepers == 0


async def test_reject_mode_retry_after_is_the_wait_needed() -> None:
    """Mode reject refuses at once with retry_after_s = the wait after which it would pass."""
    clock = ManualClock()
    rl = limiter(clock, requests_per_s=2.0, burst=1.0, mode="reject")
    await rl.admit(0, no_deadline(clock))
    with pytest.raises(errors.RateLimitedError) as info:
        await rl.admit(0, no_deadline(clock))
    assert info.value.retry_after_s == pytest.approx(0.5)
    assert info.value.upstream == UP
    await clock.advance(0.375)
    with pytest.raises(errors.RateLimitedError) as info:
        await rl.admit(0, no_deadline(clock))
    assert info.value.retry_after_s == pytest.approx(0.125)
    await clock.advance(0.125)
    await rl.admit(0, no_deadline(clock))
    assert rl.rejected == 2 and clock.sleepers == 0


async def test_wait_mode_sleeps_exactly_the_computed_wait() -> None:
    """Mode wait reserves the next slots and sleeps until each: 0.25 s, then 0.5 s."""
    clock = ManualClock()
    rl = limiter(clock, requests_per_s=4.0, burst=1.0, mode="wait")
    start = clock.now()
    await rl.admit(0, no_deadline(clock))
    assert clock.sleepers == 0
    admitted_at: list[float] = []

    async def call() -> None:
        await rl.admit(0, no_deadline(clock))
        admitted_at.append(clock.now() - start)

    tasks = [asyncio.create_task(call()) for _ in range(2)]
    await settle()
    assert clock.sleepers == 2 and admitted_at == []
    await clock.advance(0.125)
    await settle()
    assert admitted_at == []
    await clock.advance(0.125)
    await settle()
    assert admitted_at == [pytest.approx(0.25)]
    await clock.advance(0.25)
    await settle()
    assert admitted_at == [pytest.approx(0.25), pytest.approx(0.5)]
    await asyncio.gather(*tasks)
    assert rl.waited_s == pytest.approx(0.75) and rl.rejected == 0


async def test_max_wait_caps_the_wait() -> None:
    """A wait longer than max_wait_s is refused at once, reserving nothing."""
    clock = ManualClock()
    rl = limiter(clock, requests_per_s=2.0, burst=1.0, mode="wait", max_wait_s=0.3)
    await rl.admit(0, no_deadline(clock))
    with pytest.raises(errors.RateLimitedError) as info:
        await rl.admit(0, no_deadline(clock))
    assert info.value.retry_after_s == pytest.approx(0.5)
    assert clock.sleepers == 0 and rl.waited_s == 0.0
    await clock.advance(0.5)
    await rl.admit(0, no_deadline(clock))  # the refusal took no slot
    assert clock.sleepers == 0


async def test_deadline_caps_the_wait() -> None:
    """A wait beyond the caller's deadline is refused; one within it is waited for."""
    clock = ManualClock()
    rl = limiter(clock, requests_per_s=2.0, burst=1.0, mode="wait", max_wait_s=5.0)
    await rl.admit(0, no_deadline(clock))
    with pytest.raises(errors.RateLimitedError) as info:
        await rl.admit(0, Deadline.after(clock, 0.2))
    assert info.value.retry_after_s == pytest.approx(0.5)
    task = asyncio.create_task(rl.admit(0, Deadline.after(clock, 1.0)))
    await settle()
    assert clock.sleepers == 1
    await clock.advance(0.5)
    await task


async def test_tokens_settle_with_actual_usage() -> None:
    """The estimate is reserved up front and corrected to the usage reported."""
    clock = ManualClock()
    rl = limiter(clock, tokens_per_min=6000)
    assert rl.tokens is not None and rl.requests is None
    permit = await rl.admit(1000, no_deadline(clock))
    assert rl.tokens.available() == pytest.approx(5000)
    permit.release(Outcome(Verdict.SUCCESS, usage=Usage(input_tokens=200, output_tokens=100)))
    assert rl.tokens.available() == pytest.approx(5700)
    more = await rl.admit(100, no_deadline(clock))
    more.release(Outcome(Verdict.SUCCESS, usage=Usage(input_tokens=900, output_tokens=600)))
    assert rl.tokens.available() == pytest.approx(4200)
    assert rl.status()["rate_limit.tokens_available"] == pytest.approx(4200)


async def test_failed_call_without_usage_refunds_its_estimate() -> None:
    """A failure that reports no usage gives back its whole estimate; a bare success keeps it."""
    clock = ManualClock()
    rl = limiter(clock, tokens_per_min=6000)
    assert rl.tokens is not None
    (await rl.admit(1000, no_deadline(clock))).release(FAILED)
    assert rl.tokens.available() == pytest.approx(6000)
    (await rl.admit(1000, no_deadline(clock))).release(SUCCESS)
    assert rl.tokens.available() == pytest.approx(5000)


async def test_token_budget_spent_rejects_and_refunds_the_request() -> None:
    """When tokens run out the call is refused and its request slot given back."""
    clock = ManualClock()
    rl = limiter(clock, requests_per_s=1.0, burst=3.0, tokens_per_min=600, mode="reject")
    assert rl.requests is not None and rl.tokens is not None
    await rl.admit(400, no_deadline(clock))
    with pytest.raises(errors.RateLimitedError) as info:
        await rl.admit(400, no_deadline(clock))
    assert info.value.retry_after_s == pytest.approx(20.0)  # 200 tokens short at 10 a second
    assert rl.requests.available() == pytest.approx(2.0)
    assert rl.tokens.available() == pytest.approx(200)
    await rl.admit(200, no_deadline(clock))


async def test_zero_estimate_takes_no_tokens() -> None:
    """A call with no token estimate takes a request but leaves the token bucket alone."""
    clock = ManualClock()
    rl = limiter(clock, requests_per_s=5.0, tokens_per_min=600)
    assert rl.tokens is not None and rl.requests is not None
    permit = await rl.admit(0, no_deadline(clock))
    permit.release(Outcome(Verdict.SUCCESS, usage=Usage(input_tokens=50)))
    assert rl.tokens.available() == pytest.approx(600)
    assert rl.requests.available() == pytest.approx(4.0)  # burst defaults to the rate


async def test_cancellation_while_waiting_refunds() -> None:
    """A call cancelled in the wait queue gives back its request and its tokens."""
    clock = ManualClock()
    rl = limiter(clock, requests_per_s=2.0, burst=1.0, tokens_per_min=6000, mode="wait")
    assert rl.requests is not None and rl.tokens is not None
    await rl.admit(100, no_deadline(clock))
    requests_before, tokens_before = rl.requests.available(), rl.tokens.available()
    waiting = asyncio.create_task(rl.admit(100, no_deadline(clock)))
    await settle()
    assert clock.sleepers == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert clock.sleepers == 0
    assert rl.requests.available() == pytest.approx(requests_before)
    assert rl.tokens.available() == pytest.approx(tokens_before)
    with pytest.raises(errors.RateLimitedError) as info:
        await rl.admit(0, Deadline.after(clock, 0.1))
    assert info.value.retry_after_s == pytest.approx(0.5)  # not 1.0: the slot came back


def test_estimate_tokens_chat() -> None:
    """A chat call: ~4 characters a token over all messages, +1, plus the output cap."""
    body = {"messages": [{"role": "user", "content": "a" * 40}, {"content": "b" * 8}]}
    assert estimate_tokens(body) == 12 + 1 + DEFAULT_OUTPUT_TOKENS
    parts = {"messages": [{"content": [{"type": "text", "text": "x" * 20}, {"type": "image"}]}]}
    assert estimate_tokens(parts) == 5 + 1 + DEFAULT_OUTPUT_TOKENS


def test_estimate_tokens_max_tokens() -> None:
    """max_completion_tokens, else max_tokens, replaces the default output estimate."""
    messages = [{"content": "a" * 40}]
    assert estimate_tokens({"messages": messages, "max_tokens": 50}) == 61
    both = {"messages": messages, "max_tokens": 50, "max_completion_tokens": 7}
    assert estimate_tokens(both) == 18
    for bad in (0, -5, "100", None):
        body = {"messages": messages, "max_tokens": bad}
        assert estimate_tokens(body) == 11 + DEFAULT_OUTPUT_TOKENS


def test_estimate_tokens_embeddings() -> None:
    """Embeddings count their input and no output tokens."""
    assert estimate_tokens({"model": "e", "input": "x" * 80}) == 21
    assert estimate_tokens({"model": "e", "input": ["abcd", "efgh"]}) == 3
    assert estimate_tokens({"model": "e", "input": "hi", "max_tokens": 500}) == 1


def test_estimate_tokens_not_a_dict() -> None:
    """A body that is not a JSON object estimates to 0 tokens."""
    assert estimate_tokens(None) == 0
    assert estimate_tokens([1, 2, 3]) == 0
    assert estimate_tokens("hello") == 0


async def test_estimate_above_the_whole_token_bucket_is_refused_at_once() -> None:
    """A call estimated above tokens_per_min could never be admitted: it is refused at once,
    in either mode, with no retry delay, and takes nothing from either bucket."""
    clock = ManualClock()
    for mode in ("wait", "reject"):
        rl = limiter(clock, requests_per_s=1.0, burst=2.0, tokens_per_min=600, mode=mode)
        assert rl.requests is not None and rl.tokens is not None
        with pytest.raises(errors.RateLimitedError) as info:
            await rl.admit(601, no_deadline(clock))
        assert info.value.retry_after_s is None
        assert "estimated 601 tokens exceed tokens_per_min (600)" in info.value.message
        assert rl.rejected == 1 and clock.sleepers == 0
        assert rl.requests.available() == pytest.approx(2.0)
        assert rl.tokens.available() == pytest.approx(600)
        await rl.admit(600, no_deadline(clock))  # the whole bucket is still fine


def test_refusal_without_delay_has_no_retry_info() -> None:
    """The gRPC status of such a refusal carries no RetryInfo."""
    exc = errors.RateLimitedError("too big", upstream=UP)
    _code, _message, rich = status.to_rich_status(exc)
    assert all("RetryInfo" not in detail.type_url for detail in rich.details)
