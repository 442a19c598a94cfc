"""Rate limits shared by every sidecar on one Redis store (`state.backend: redis`).

The same GCRA buckets as `ratelimit` (requests, tokens), kept in Redis under the upstream's
name and taken by one script per call, on the Redis server's clock: one round trip admits a
call (both buckets at once, atomically; a denial takes nothing). Token estimates are reserved
there before the call and settled with the real usage after it (the settlement rides on the
next admission's round trip, or is sent alone within SETTLE_FLUSH_S); a call cancelled
while it waits gives its reservation back. Mode `wait`, `max_wait_s`, the deadline
and the retry delays are those of the local limiter.

When the store fails, `on_store_error` decides: `fail_open` (the default) limits the call
locally at 1/`state.replicas` of each limit (this class is a `RateLimiter` at that share),
`fail_closed` refuses it (`StateUnavailableError`, UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import contextlib

from sidecar.config import RateLimitPolicy
from sidecar.policies.base import Outcome, Permit
from sidecar.policies.clock import Clock
from sidecar.policies.deadline import Deadline
from sidecar.policies.ratelimit import RateLimiter, TokenPermit
from sidecar.state.store import StateStore, StoreError

POLICY = "rate_limit"
US = 1e6
# Settlements wait this long for the next admission to carry them (no round trip of their
# own under steady traffic); then they are sent alone.
SETTLE_FLUSH_S = 0.05


class SharedTokenPermit:
    """Settles a token reservation in the store with the usage the upstream reported."""

    __slots__ = ("_estimate", "_limiter")

    def __init__(self, limiter: SharedRateLimiter, estimate: int) -> None:
        self._limiter = limiter
        self._estimate = estimate

    def release(self, outcome: Outcome) -> None:
        usage = outcome.usage
        actual = usage.total_tokens if usage is not None else None
        if actual is not None and actual > 0:
            self._limiter.settle(actual - self._estimate)
        elif outcome.error is not None:
            self._limiter.settle(-self._estimate)  # failed without usage: nothing spent


class SharedRateLimiter(RateLimiter):
    """The limits of one upstream, shared through the store; locally at 1/replicas while
    the store is down (see the module)."""

    def __init__(
        self, upstream: str, policy: RateLimitPolicy, clock: Clock, store: StateStore
    ) -> None:
        super().__init__(upstream, policy, clock, share=store.replicas)
        self._store = store
        self._keys = [store.key(upstream, "requests"), store.key(upstream, "tokens")]
        rps, tpm = policy.requests_per_s, policy.tokens_per_min
        self._req_interval = US / rps if rps else 0.0
        self._req_tolerance = (policy.burst or max(1.0, rps or 1.0)) * self._req_interval
        self._tok_interval = 60 * US / tpm if tpm else 0.0
        self._tok_tolerance = 60 * US if tpm else 0.0
        # What the buckets owed (TAT - now, us) at the last answer, for the gauges.
        self._owed = (0.0, 0.0)
        self._owed_at = clock.now()
        self._settle = 0  # tokens used minus estimated, not sent yet
        self._flusher: asyncio.Task[None] | None = None

    async def admit(self, estimate: int, deadline: Deadline) -> Permit:
        tpm = self.policy.tokens_per_min
        if tpm and estimate > tpm:
            raise self._too_large(estimate, tpm)
        health = self._store.health
        if health.up:
            try:
                return await self._admit_shared(estimate if tpm else 0, deadline)
            except StoreError:
                pass  # counted and logged by the store: this call is decided without it
        if self.policy.on_store_error == "fail_closed":
            raise health.unavailable(self.upstream, POLICY)
        health.fell_back(self.upstream, POLICY)
        return await super().admit(estimate, deadline)

    async def _admit_shared(self, cost: int, deadline: Deadline) -> Permit:
        settle, self._settle = self._settle, 0  # carried by this round trip
        args = [self._req_interval, self._req_tolerance, self._tok_interval,
                self._tok_tolerance, cost, self._max_wait(deadline) * US,
                settle * self._tok_interval]  # fmt: skip
        reply = await self._store.run("rate_take", self._keys, args,
                                      upstream=self.upstream, policy=POLICY)  # fmt: skip
        admitted, wait_us, req_owed, tok_owed = (int(x) for x in reply)
        self._owed, self._owed_at = (req_owed, tok_owed), self._clock.now()
        if not admitted:
            raise self._limited(wait_us / US)
        if wait_us > 0:
            wait = wait_us / US
            self.waited_s += wait
            try:
                await self._clock.sleep(wait)
            except asyncio.CancelledError:
                self.adjust(-1, -cost)
                raise
        return SharedTokenPermit(self, cost) if cost else TokenPermit(None, 0)

    def settle(self, tokens: int) -> None:
        """Correct the token bucket by `tokens` (usage minus estimate): carried by the next
        admission, or sent after SETTLE_FLUSH_S without one."""
        if not tokens or not self._tok_interval or not self._store.health.up:
            return
        self._settle += tokens
        if self._flusher is None or self._flusher.done():
            self._flusher = self._store.spawn(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(SETTLE_FLUSH_S)  # I/O batching: real time, not the policies'
        tokens, self._settle = self._settle, 0
        if tokens:
            await self._adjust([self._keys[1]], [tokens * self._tok_interval])

    def adjust(self, requests: int, tokens: int) -> None:
        """Give back (negative) or add requests and tokens in the store, in the background."""
        keys, deltas = [], []
        if requests and self._req_interval:
            keys.append(self._keys[0])
            deltas.append(requests * self._req_interval)
        if tokens and self._tok_interval:
            keys.append(self._keys[1])
            deltas.append(tokens * self._tok_interval)
        if keys and self._store.health.up:
            self._store.spawn(self._adjust(keys, deltas))

    async def _adjust(self, keys: list[str], deltas: list[float]) -> None:
        with contextlib.suppress(StoreError):  # counted and logged; the estimate stays
            await self._store.run("rate_adjust", keys, deltas, upstream=self.upstream,
                                  policy=POLICY)  # fmt: skip

    def status(self) -> dict[str, float]:
        if not self._store.health.up:
            return super().status()  # the local share decides now
        gauges = {"rate_limit.rejected": float(self.rejected)}
        elapsed = (self._clock.now() - self._owed_at) * US
        for name, owed, interval, tolerance in (
            ("requests", self._owed[0], self._req_interval, self._req_tolerance),
            ("tokens", self._owed[1], self._tok_interval, self._tok_tolerance),
        ):
            if interval:
                left = max(0.0, owed - elapsed)
                gauges[f"rate_limit.{name}_available"] = max(0.0, (tolerance - left) / interval)
        return gauges
