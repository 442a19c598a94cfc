"""The HTTP front's error table: OpenAI-shaped bodies from the sidecar's errors."""

from __future__ import annotations

from sidecar import errors, status
from sidecar.http.errors import TABLE, describe


def test_every_reason_has_an_http_row() -> None:
    """Each reason of the gRPC table has a row in the HTTP table (they cannot drift)."""
    assert {reason for _, reason in status.TABLE.values()} <= set(TABLE)


def test_rate_limited_rounds_retry_after_up() -> None:
    """A rate-limited call is a 429 with Retry-After in whole seconds, rounded up."""
    exc = errors.RateLimitedError("slow down", upstream="llm", retry_after_s=1.2)
    http_status, body, headers = describe(exc)
    assert (http_status, headers) == (429, {"Retry-After": "2"})
    assert body["error"]["code"] == "rate_limit_exceeded"


def test_upstream_client_error_keeps_status_and_provider_error() -> None:
    """An upstream 4xx keeps its status and the provider's message, type and code."""
    body = '{"error": {"message": "too long", "type": "invalid_request_error", "code": "ctx"}}'
    exc = errors.UpstreamClientError(
        "upstream said 422", upstream="llm", http_status=422, body=body
    )
    http_status, answer, _ = describe(exc)
    assert http_status == 422
    assert answer["error"] == {"message": "too long", "type": "invalid_request_error",
                               "param": None, "code": "ctx"}  # fmt: skip


def test_internal_errors_say_nothing_inside() -> None:
    """An unexpected exception is a 500 whose message reveals nothing of it."""
    http_status, body, _ = describe(RuntimeError("secret detail"))
    assert http_status == 500
    assert "secret" not in body["error"]["message"]


def test_breaker_and_deadline() -> None:
    """An open circuit is a 503 and an upstream timeout a 504."""
    assert describe(errors.CircuitOpenError("open", upstream="llm"))[0] == 503
    assert describe(errors.UpstreamTimeoutError("slow", upstream="llm"))[0] == 504
    assert describe(errors.UpstreamUnavailableError("down", upstream="llm"))[0] == 502
