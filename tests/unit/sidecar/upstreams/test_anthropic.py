"""The Anthropic adapter's pure parts: its stream decoder, usage, error types, requests."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar import errors
from sidecar.config import AnthropicUpstreamConfig
from sidecar.upstreams._sse import END, SKIP
from sidecar.upstreams.anthropic import (
    ERROR_STATUS,
    AnthropicUpstream,
    _MessageEvents,
    error_type,
    usage_of,
)
from sidecar.upstreams.base import Upstream, UpstreamRequest, Usage

KEY = "sk-ant-SECRET-42"
BODY = {"model": "claude-x", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
USAGE = {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}
START = {"type": "message_start",
         "message": {"id": "msg_1", "type": "message", "content": [], "usage": USAGE}}  # fmt: skip
DELTA = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}}
FINAL = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 7}}  # fmt: skip


def adapter(**extra: Any) -> AnthropicUpstream:
    config = AnthropicUpstreamConfig.model_validate(
        {"type": "anthropic", "base_url": "https://api.example.test/", **extra}
    )
    return AnthropicUpstream("claude", config, api_key=KEY, max_response_bytes=1 << 20)


def event(obj: Any) -> bytes:
    return orjson.dumps(obj)


def request(body: Any = BODY, operation: str = "messages") -> UpstreamRequest:
    return UpstreamRequest(operation, orjson.dumps(body), body)


def test_a_whole_stream() -> None:
    """Content events pass byte for byte, ping is skipped, message_stop ends it; usage joins
    message_start's input (cache included) with message_delta's output."""
    decode = _MessageEvents(adapter())
    first = decode(event(START))
    assert first.data == event(START) and first.usage == Usage(15, 1)
    assert decode(b'{"type": "ping"}') is SKIP
    assert decode(event(DELTA)).usage is None
    assert decode(event({"type": "content_block_stop", "index": 0})).usage is None
    assert decode(event(FINAL)).usage == Usage(15, 7)
    assert decode(b'{"type":"message_stop"}') is END


def test_unknown_event_types_pass() -> None:
    """An event type added to the API later reaches the caller unchanged."""
    decode = _MessageEvents(adapter())
    decode(event(START))
    assert decode(b'{"type":"citation_added","x":1}').data == b'{"type":"citation_added","x":1}'


@pytest.mark.parametrize(
    "data",
    [b"{not json", b"[1, 2]", event(DELTA), event({"no": "type"})],
)
def test_broken_streams_fail_cleanly(data: bytes) -> None:
    """Garbage, a non-object, or a stream not begun by message_start is a bad response."""
    with pytest.raises(errors.UpstreamBadResponseError):
        _MessageEvents(adapter())(data)


def test_an_event_without_type_after_the_start() -> None:
    """After message_start, an event without a type is a bad response, not content."""
    decode = _MessageEvents(adapter())
    decode(event(START))
    with pytest.raises(errors.UpstreamBadResponseError, match="without a type"):
        decode(b'{"index": 0}')


@pytest.mark.parametrize(
    ("kind", "error", "status"),
    [
        ("overloaded_error", errors.UpstreamUnavailableError, 529),
        ("api_error", errors.UpstreamUnavailableError, 500),
        ("rate_limit_error", errors.UpstreamClientError, 429),
        ("invalid_request_error", errors.UpstreamClientError, 400),
        ("something_new", errors.UpstreamUnavailableError, 500),
    ],
)
def test_error_events(kind: str, error: type[errors.UpstreamError], status: int) -> None:
    """An `event: error`, first or mid-stream, is the error of the status its type means."""
    data = event({"type": "error", "error": {"type": kind, "message": f"{kind} {KEY}"}})
    for started in (False, True):
        decode = _MessageEvents(adapter())
        if started:
            decode(event(START))
        with pytest.raises(error) as caught:
            decode(data)
        assert caught.value.http_status == status
        assert KEY not in caught.value.message


def test_prompt_too_long_event_is_a_context_error() -> None:
    """Anthropic's 'prompt is too long' is a 400 marked context_exceeded, its body kept."""
    message = "prompt is too long: 210000 tokens > 200000 maximum"
    data = event({"type": "error", "error": {"type": "invalid_request_error", "message": message}})
    with pytest.raises(errors.UpstreamClientError) as caught:
        _MessageEvents(adapter())(data)
    assert caught.value.context_exceeded
    assert message in caught.value.body


def test_usage_of() -> None:
    """Usage counts cache tokens as input; the known input fills a usage without one."""
    assert usage_of(None) is None
    assert usage_of({"input_tokens": 3, "cache_creation_input_tokens": 2,
                     "output_tokens": 4}) == Usage(5, 4)  # fmt: skip
    assert usage_of({"output_tokens": 9}, 12) == Usage(12, 9)
    assert usage_of({"input_tokens": "x", "output_tokens": True}) == Usage(0, 0)


def test_error_types_by_status() -> None:
    """Every documented type maps back from its status; 503 is overloaded, others by class."""
    assert all(error_type(status) == kind for kind, status in ERROR_STATUS.items())
    assert error_type(503) == "overloaded_error"
    assert (error_type(502), error_type(418)) == ("api_error", "invalid_request_error")


def test_headers_url_and_payloads() -> None:
    """x-api-key and anthropic-version, no bearer; the config's headers win; the URL is
    {base_url}/v1/messages; a unary call turns stream off, a stream turns it on."""
    up = adapter(headers={"anthropic-beta": "tools-1"}, anthropic_version="2099-01-01")
    assert isinstance(up, Upstream)
    headers = up._headers_for(request())
    assert headers["x-api-key"] == KEY and "Authorization" not in headers
    assert headers["anthropic-version"] == "2099-01-01"
    assert headers["anthropic-beta"] == "tools-1"
    url, payload, _ = up._stream_request(request())
    assert url == "https://api.example.test/v1/messages"
    assert orjson.loads(payload)["stream"] is True
    sent = request({**BODY, "stream": True})
    assert up._stream_request(sent)[1] is sent.payload


@pytest.mark.parametrize(
    ("body", "operation", "field"),
    [
        (BODY, "chat", "operation"),
        ({**BODY, "max_tokens": 0}, "messages", "payload.max_tokens"),
        ({k: v for k, v in BODY.items() if k != "max_tokens"}, "messages", "payload.max_tokens"),
        ({**BODY, "messages": "hi"}, "messages", "payload.messages"),
        ({**BODY, "system": 3}, "messages", "payload.system"),
        ([BODY], "messages", "payload"),
    ],
)
def test_validate(body: Any, operation: str, field: str) -> None:
    """Requests the Messages API would refuse are refused before they are sent."""
    with pytest.raises(errors.InvalidRequestError) as caught:
        adapter().validate(request(body, operation))
    assert caught.value.field == field
