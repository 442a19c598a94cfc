"""The one rule for what counts against an upstream: `verdict_of` and its helpers."""

from __future__ import annotations

import asyncio

import pytest

from sidecar import errors
from sidecar.policies.base import (
    NEUTRAL,
    SUCCESS,
    UPSTREAM_SIDE_4XX,
    Outcome,
    Verdict,
    outcome_of,
    succeeded,
    verdict_of,
)
from sidecar.upstreams.base import Usage

UP = "llm"


def client_error(status: int) -> errors.UpstreamClientError:
    return errors.UpstreamClientError("refused", upstream=UP, http_status=status)


def test_upstream_timeout_is_failure() -> None:
    """A timeout of the upstream's own per-attempt limit counts as a failure."""
    assert verdict_of(errors.UpstreamTimeoutError("slow", upstream=UP)) is Verdict.FAILURE


def test_caller_deadline_timeout_is_neutral() -> None:
    """A timeout cut by the caller's deadline says nothing about the upstream: NEUTRAL."""
    exc = errors.UpstreamTimeoutError("slow", upstream=UP, caller_deadline=True)
    assert verdict_of(exc) is Verdict.NEUTRAL


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 499])
def test_caller_caused_4xx_is_success(status: int) -> None:
    """A 4xx the caller caused means the upstream answered: SUCCESS."""
    assert verdict_of(client_error(status)) is Verdict.SUCCESS


@pytest.mark.parametrize("status", [408, 429])
def test_upstream_side_4xx_is_failure(status: int) -> None:
    """408 and 429 say the upstream is struggling: FAILURE."""
    assert status in UPSTREAM_SIDE_4XX
    assert verdict_of(client_error(status)) is Verdict.FAILURE


@pytest.mark.parametrize("status", [0, 500, 502, 503, 504])
def test_unavailable_is_failure(status: int) -> None:
    """5xx, refused or reset connections are failures, with or without a status."""
    exc = errors.UpstreamUnavailableError("down", upstream=UP, http_status=status)
    assert verdict_of(exc) is Verdict.FAILURE


@pytest.mark.parametrize(
    "exc",
    [
        errors.UpstreamBadResponseError("garbage", upstream=UP),
        errors.UpstreamResponseTooLargeError("huge", upstream=UP),
        errors.UpstreamError("other", upstream=UP, http_status=500),
    ],
)
def test_other_upstream_errors_are_failures(exc: errors.UpstreamError) -> None:
    """Any other upstream error (garbage, oversize, plain UpstreamError) is a failure."""
    assert verdict_of(exc) is Verdict.FAILURE


@pytest.mark.parametrize(
    "exc",
    [
        errors.CircuitOpenError("open", upstream=UP, retry_after_s=1.0),
        errors.RateLimitedError("limited", upstream=UP, retry_after_s=1.0),
        errors.OverloadedError("full", upstream=UP),
        errors.PolicyError("refused", upstream=UP),
    ],
)
def test_policy_errors_are_neutral(exc: errors.PolicyError) -> None:
    """The sidecar's own refusals never count against the upstream."""
    assert verdict_of(exc) is Verdict.NEUTRAL


@pytest.mark.parametrize(
    "exc",
    [
        asyncio.CancelledError(),
        errors.InvalidRequestError("bad", field="body"),
        ValueError("a bug"),
        KeyboardInterrupt(),
    ],
)
def test_cancellation_and_non_upstream_errors_are_neutral(exc: BaseException) -> None:
    """Cancellation, invalid requests and bugs are NEUTRAL."""
    assert verdict_of(exc) is Verdict.NEUTRAL


def test_outcome_of_keeps_the_error() -> None:
    """`outcome_of` pairs the verdict with the error and carries no usage."""
    exc = client_error(403)
    outcome = outcome_of(exc)
    assert outcome == Outcome(Verdict.SUCCESS, exc)
    assert outcome.error is exc and outcome.usage is None
    failed = outcome_of(errors.UpstreamUnavailableError("down", upstream=UP))
    assert failed.verdict is Verdict.FAILURE


def test_outcome_constants_and_usage() -> None:
    """SUCCESS and NEUTRAL are bare outcomes; an outcome can carry usage and is frozen."""
    assert Outcome(Verdict.SUCCESS) == SUCCESS and SUCCESS.error is None
    assert Outcome(Verdict.NEUTRAL) == NEUTRAL and NEUTRAL.usage is None
    outcome = Outcome(Verdict.SUCCESS, usage=Usage(input_tokens=3, output_tokens=4))
    assert outcome.usage is not None and outcome.usage.total_tokens == 7
    with pytest.raises(AttributeError):
        outcome.verdict = Verdict.FAILURE  # type: ignore[misc]


def test_succeeded_shares_success_without_usage() -> None:
    """`succeeded` reuses the SUCCESS constant when no usage was reported."""
    assert succeeded(None) is SUCCESS
    usage = Usage(input_tokens=1, output_tokens=2)
    assert succeeded(usage) == Outcome(Verdict.SUCCESS, usage=usage)
