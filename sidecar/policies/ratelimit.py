"""Rate limits: requests per second with a burst, and model tokens per minute.

Both are GCRA buckets (the generic cell rate algorithm: a token bucket kept as one number,
the theoretical arrival time). The `limits` library was the first choice, but it has no token
bucket (its strategies are fixed, moving and sliding windows): a window of B calls per B/R s
admits B calls at each window start, not B at once then R per second, and it cannot
reserve a slot in the future for mode `wait` nor settle a token estimate with the real usage.
GCRA does all three in a few lines, and is one atomic script when the state moves to Redis.

Tokens are estimated from the request before the call and corrected with the usage the
upstream reports after it. Mode `wait` reserves the earliest slot and sleeps until it (up to
`max_wait_s` and the caller's deadline); mode `reject` refuses at once. Refusals carry the
delay after which the call would be admitted; a call estimated above the whole of
`tokens_per_min` never would be, and is refused at once without one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.config import RateLimitPolicy
from sidecar.errors import RateLimitedError
from sidecar.policies.base import Outcome, Permit
from sidecar.policies.clock import Clock
from sidecar.policies.deadline import Deadline

# Without max_tokens in the request, assume this many completion tokens until usage arrives.
DEFAULT_OUTPUT_TOKENS = 256
CHARS_PER_TOKEN = 4
# Sums of float intervals on a monotonic clock drift by a few ulps (~1e-13 s, more after long
# uptimes): a wait below this is none, or a burst of B would admit only B - 1 at once.
EPSILON_S = 1e-6


class Bucket:
    """A GCRA bucket: `rate_per_s` units per second, up to `burst` at once."""

    __slots__ = ("_clock", "burst", "interval", "rate_per_s", "tat", "tolerance")

    def __init__(self, rate_per_s: float, burst: float, clock: Clock) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.interval = 1.0 / rate_per_s
        self.tolerance = burst * self.interval
        self._clock = clock
        self.tat = clock.now()

    def reserve(self, cost: float, max_wait_s: float) -> float:
        """Take `cost` units; returns how long to wait for them, or raises _Denied."""
        now = self._clock.now()
        new_tat = max(self.tat, now) + cost * self.interval
        wait = new_tat - self.tolerance - now
        if wait > max_wait_s + EPSILON_S:
            raise _Denied(wait)
        self.tat = new_tat
        return wait if wait > EPSILON_S else 0.0

    def adjust(self, cost: float) -> None:
        """Add (or, negative, give back) `cost` units after the fact."""
        self.tat = max(self.tat + cost * self.interval, self._clock.now())

    def available(self) -> float:
        """Units that could be taken now without waiting."""
        used = max(0.0, self.tat - self._clock.now())
        return max(0.0, (self.tolerance - used) / self.interval)


class _Denied(Exception):
    def __init__(self, wait_s: float) -> None:
        self.wait_s = wait_s


def estimate_tokens(body: Any) -> int:
    """Tokens a model call may use: its prompt (~4 characters a token) plus its output cap."""
    if not isinstance(body, dict):
        return 0
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(
                len(str(part.get("text", ""))) for part in content if isinstance(part, dict)
            )
    inputs = body.get("input")
    if isinstance(inputs, str | list):
        chars += len(inputs) if isinstance(inputs, str) else sum(len(str(i)) for i in inputs)
    output = body.get("max_completion_tokens") or body.get("max_tokens")
    output = output if isinstance(output, int) and output > 0 else DEFAULT_OUTPUT_TOKENS
    if body.get("input") is not None and "messages" not in body:
        output = 0  # embeddings produce no completion tokens
    return chars // CHARS_PER_TOKEN + 1 + output


class TokenPermit:
    """Settles the token estimate with the usage the upstream reported."""

    __slots__ = ("_bucket", "_estimate")

    def __init__(self, bucket: Bucket | None, estimate: int) -> None:
        self._bucket = bucket
        self._estimate = estimate

    def release(self, outcome: Outcome) -> None:
        if self._bucket is None:
            return
        usage = outcome.usage
        actual = usage.total_tokens if usage is not None else None
        if actual is not None and actual > 0:
            self._bucket.adjust(actual - self._estimate)
        elif outcome.error is not None:
            self._bucket.adjust(-self._estimate)  # failed without usage: nothing was spent


class RateLimiter:
    """The request and token limits of one upstream; with `share` N, 1/N of each (the part
    of one of N sidecars whose shared limit is unavailable)."""

    def __init__(
        self, upstream: str, policy: RateLimitPolicy, clock: Clock, *, share: int = 1
    ) -> None:
        self.upstream = upstream
        self.policy = policy
        self.rejected = 0
        self.waited_s = 0.0
        self._clock = clock
        rps = policy.requests_per_s
        if rps:
            burst = policy.burst or max(1.0, rps)
            self.requests: Bucket | None = Bucket(rps / share, max(1.0, burst / share), clock)
        else:
            self.requests = None
        tpm = policy.tokens_per_min
        self.tokens = Bucket(tpm / 60.0 / share, tpm / share, clock) if tpm else None

    def _max_wait(self, deadline: Deadline) -> float:
        if self.policy.mode == "reject":
            return 0.0
        return deadline.cap(self.policy.max_wait_s)[0]

    def _reserve(self, estimate: int, max_wait_s: float) -> float:
        wait = 0.0
        if self.requests is not None:
            wait = self.requests.reserve(1, max_wait_s)
        if self.tokens is not None and estimate:
            try:
                wait = max(wait, self.tokens.reserve(estimate, max_wait_s))
            except _Denied:
                if self.requests is not None:
                    self.requests.adjust(-1)
                raise
        return wait

    def _refund(self, estimate: int) -> None:
        if self.requests is not None:
            self.requests.adjust(-1)
        if self.tokens is not None and estimate:
            self.tokens.adjust(-estimate)

    def _too_large(self, estimate: int, limit: float) -> RateLimitedError:
        """The refusal of a call whose estimate alone exceeds the bucket: no wait would ever
        admit it, so it gets no retry delay."""
        self.rejected += 1
        return RateLimitedError(
            f"the request's estimated {estimate} tokens exceed tokens_per_min "
            f"({limit:.0f}) of upstream {self.upstream!r}",
            upstream=self.upstream,
        )

    def _limited(self, wait_s: float) -> RateLimitedError:
        """The refusal of a call that would have to wait `wait_s`, longer than allowed."""
        self.rejected += 1
        return RateLimitedError(
            f"rate limit of upstream {self.upstream!r} reached",
            upstream=self.upstream,
            retry_after_s=wait_s,
        )

    async def admit(self, estimate: int, deadline: Deadline) -> Permit:
        """Take one request and `estimate` tokens, waiting in mode `wait`; else refuse."""
        if self.tokens is not None and estimate > self.tokens.burst:
            raise self._too_large(estimate, self.tokens.burst)
        try:
            wait = self._reserve(estimate, self._max_wait(deadline))
        except _Denied as denied:
            raise self._limited(denied.wait_s) from None
        if wait > 0:
            self.waited_s += wait
            try:
                await self._clock.sleep(wait)
            except asyncio.CancelledError:
                self._refund(estimate)
                raise
        return TokenPermit(self.tokens if estimate else None, estimate)

    def status(self) -> dict[str, float]:
        gauges = {"rate_limit.rejected": float(self.rejected)}
        if self.requests is not None:
            gauges["rate_limit.requests_available"] = self.requests.available()
        if self.tokens is not None:
            gauges["rate_limit.tokens_available"] = self.tokens.available()
        return gauges
