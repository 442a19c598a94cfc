"""The rate limiter and breaker of an upstream: local, or shared through the state store."""

from __future__ import annotations

from sidecar.config import BreakerPolicy, RateLimitPolicy
from sidecar.policies.breaker import Breaker
from sidecar.policies.clock import Clock
from sidecar.policies.ratelimit import RateLimiter
from sidecar.policies.shared_breaker import SharedBreaker
from sidecar.policies.shared_ratelimit import SharedRateLimiter
from sidecar.state.store import StateStore


def make_limiter(
    upstream: str, policy: RateLimitPolicy, clock: Clock, state: StateStore | None
) -> RateLimiter:
    """This process's limiter, or one shared by every sidecar on `state`."""
    if state is None:
        return RateLimiter(upstream, policy, clock)
    return SharedRateLimiter(upstream, policy, clock, state)


def make_breaker(
    upstream: str,
    policy: BreakerPolicy,
    clock: Clock,
    state: StateStore | None,
    *,
    attempt_timeout_s: float,
) -> Breaker:
    """This process's breaker, or one shared by every sidecar on `state`."""
    if state is None:
        return Breaker(upstream, policy, clock)
    return SharedBreaker(upstream, policy, clock, state, attempt_timeout_s=attempt_timeout_s)
