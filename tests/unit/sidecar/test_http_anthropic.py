"""The Anthropic side of the HTTP front: its error shapes from the one table, SSE framing."""

from __future__ import annotations

import orjson
import pytest

from sidecar import errors
from sidecar.http.anthropic import AnthropicFraming, event_name
from sidecar.http.errors import (
    INTERNAL,
    TABLE,
    UnknownModelError,
    describe,
    describe_anthropic,
)
from sidecar.upstreams.anthropic import ERROR_STATUS, error_type


def test_every_status_of_the_table_has_an_anthropic_type() -> None:
    """Each status the one table gives (any reason) has a type Anthropic documents."""
    statuses = {row[0] for row in TABLE.values()} | {INTERNAL[0], 529}
    assert all(error_type(http_status) in ERROR_STATUS for http_status in statuses)


@pytest.mark.parametrize(
    ("exc", "http_status", "kind"),
    [
        (errors.InvalidRequestError("bad", field="model"), 400, "invalid_request_error"),
        (errors.UnauthenticatedError("who"), 401, "authentication_error"),
        (UnknownModelError("claude-nope", ["a"]), 404, "not_found_error"),
        (errors.PayloadTooLargeError(10, 5), 413, "request_too_large"),
        (errors.RateLimitedError("slow", upstream="u", retry_after_s=0.2), 429, "rate_limit_error"),
        (errors.CircuitOpenError("open", upstream="u", retry_after_s=3), 503, "overloaded_error"),
        (errors.UpstreamTimeoutError("slow", upstream="u"), 504, "timeout_error"),
        (errors.UpstreamUnavailableError("cut", upstream="u"), 502, "api_error"),
        (RuntimeError("secret detail"), 500, "api_error"),
    ],
)
def test_statuses_and_types(exc: Exception, http_status: int, kind: str) -> None:
    """The statuses and types Anthropic's clients expect; internals say nothing inside."""
    got, body, headers = describe_anthropic(exc)
    assert (got, body["error"]["type"]) == (http_status, kind)
    assert "secret" not in body["error"]["message"]
    if getattr(exc, "retry_after_s", None):
        assert int(headers["Retry-After"]) >= 1


def test_upstream_overloaded_keeps_529() -> None:
    """An upstream's 529 (after the retries) reaches the caller as 529 overloaded_error."""
    exc = errors.UpstreamUnavailableError("busy", upstream="claude", http_status=529)
    overloaded = {"type": "overloaded_error", "message": "busy"}
    assert describe_anthropic(exc)[:2] == (529, {"type": "error", "error": overloaded})
    assert describe(exc)[0] == 502


def test_provider_errors_pass_unchanged() -> None:
    """Anthropic's own 4xx error object passes whole; an OpenAI-shaped one keeps its message
    under Anthropic's type for the status."""
    error = {"type": "invalid_request_error", "message": "prompt is too long", "details": {}}
    body = orjson.dumps({"type": "error", "error": error}).decode()
    exc = errors.UpstreamClientError("x", upstream="c", http_status=400, body=body)
    assert describe_anthropic(exc)[1]["error"] == error
    openai_body = '{"error": {"message": "no such key", "type": "auth", "code": "k"}}'
    other = errors.UpstreamClientError("x", upstream="c", http_status=403, body=openai_body)
    denied = {"type": "permission_error", "message": "no such key"}
    assert describe_anthropic(other)[:2] == (403, {"type": "error", "error": denied})


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b'{"type":"content_block_delta","index":0}', b"content_block_delta"),
        (b'{"index": 0, "type": "message_delta"}', b"message_delta"),
        (b'{"type":"evil\\nevent: error"}', b"unknown"),
        (b'{"type": 5}', b"unknown"),
        (b"not json", b"unknown"),
    ],
)
def test_event_names(data: bytes, name: bytes) -> None:
    """An event's SSE name is its JSON's type, only ever a plain word (no injected lines)."""
    assert event_name(data) == name


def test_framing() -> None:
    """Events carry their type; the end is message_stop; an error is an in-band error event."""
    framing = AnthropicFraming()
    data = b'{"type":"message_start","message":{}}'
    assert framing.event(data) == b"event: message_start\ndata: " + data + b"\n\n"
    assert framing.end().startswith(b"event: message_stop\n")
    error = framing.error(errors.UpstreamTimeoutError("idle", upstream="c"))
    head, _, payload = error.partition(b"\ndata: ")
    assert head == b"event: error"
    assert orjson.loads(payload)["error"]["type"] == "timeout_error"
