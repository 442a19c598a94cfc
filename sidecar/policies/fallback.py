"""Fallback: which outcomes move a call on to the next upstream in `policies.fallback`.

A call falls back when its upstream refused it without trying (breaker open, rate limited,
overloaded) or failed after its retries with a failure of the upstream's own (5xx, reset,
timeout of its own `timeout_s`, 408, 429, bad response). It does not when the request is at
fault (other 4xx, invalid requests), when the caller's deadline is over, or after the last
fallback.
"""

from __future__ import annotations

from sidecar import errors
from sidecar.policies.base import Verdict, verdict_of
from sidecar.policies.deadline import Deadline

REFUSALS = (
    errors.CircuitOpenError,
    errors.RateLimitedError,
    errors.OverloadedError,
    errors.StateUnavailableError,
)


def falls_back(exc: BaseException, deadline: Deadline) -> bool:
    """Whether a call that failed with `exc` should try the next upstream."""
    if deadline.expired():
        return False
    if isinstance(exc, REFUSALS):
        return True
    return isinstance(exc, errors.UpstreamError) and verdict_of(exc) is Verdict.FAILURE
