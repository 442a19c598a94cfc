"""What every gate shares: outcomes, permits, and the one rule for what counts as a failure."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from sidecar import errors
from sidecar.upstreams.base import Usage


class Verdict(enum.Enum):
    """How a finished call counts for an upstream's health."""

    SUCCESS = "success"  # the upstream answered (a 4xx the caller caused included)
    FAILURE = "failure"  # the upstream failed: 5xx, reset, timeout, garbage, 429
    NEUTRAL = "neutral"  # nothing was learnt: cancelled, refused by the sidecar itself


@dataclass(slots=True, frozen=True)
class Outcome:
    """A call's result as the gates see it; `usage` settles token reservations."""

    verdict: Verdict
    error: BaseException | None = None
    usage: Usage | None = None


SUCCESS = Outcome(Verdict.SUCCESS)
NEUTRAL = Outcome(Verdict.NEUTRAL)

# 4xx statuses that say the upstream is struggling, not that the request was wrong.
UPSTREAM_SIDE_4XX = frozenset({408, 429})


def verdict_of(exc: BaseException) -> Verdict:
    """The one rule for what counts against an upstream (breaker, metrics)."""
    if isinstance(exc, errors.UpstreamTimeoutError):
        return Verdict.NEUTRAL if exc.caller_deadline else Verdict.FAILURE
    if isinstance(exc, errors.UpstreamClientError):
        return Verdict.FAILURE if exc.http_status in UPSTREAM_SIDE_4XX else Verdict.SUCCESS
    if isinstance(exc, errors.UpstreamError):
        return Verdict.FAILURE
    # Cancellation, the sidecar's own refusals (PolicyError, InvalidRequestError), bugs.
    return Verdict.NEUTRAL


def outcome_of(exc: BaseException) -> Outcome:
    return Outcome(verdict_of(exc), exc)


def succeeded(usage: Usage | None) -> Outcome:
    """The outcome of an answered call; the shared `SUCCESS` when it reported no usage."""
    return SUCCESS if usage is None else Outcome(Verdict.SUCCESS, usage=usage)


class Permit(Protocol):
    """What a gate hands out on admission; released exactly once with the outcome."""

    def release(self, outcome: Outcome) -> None: ...
