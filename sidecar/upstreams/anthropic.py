"""Anthropic's Messages API: operation `messages` -> `POST {base_url}/v1/messages`.

`base_url` is the API root (`https://api.anthropic.com`). The key travels in `x-api-key`, the
API version in `anthropic-version` (`anthropic_version` in the config). `call` forwards the
payload byte for byte (a `"stream": true` is turned off: a unary call needs a whole answer).
`stream` asks for server-sent events and yields the JSON of each event, except `ping`
(skipped) and `message_stop`, which ends the stream: a stream that ends without it is an
error, never a complete answer (the HTTP front writes its own `message_stop` once the call
has completed). A stream must begin with `message_start`. An `event: error` raises the error
its type stands for (`ERROR_STATUS`): `overloaded_error` is an UpstreamUnavailableError with
status 529, `rate_limit_error` an UpstreamClientError with 429, and so on, exactly as if the
API had answered that status before the stream began.

Usage: `input_tokens` is every input token (Anthropic's `input_tokens` plus the cache's
`cache_creation_input_tokens` and `cache_read_input_tokens`), `output_tokens` the output; a
stream's `message_start` reports the input, each `message_delta` the output so far.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, NoReturn

from sidecar.errors import InvalidRequestError, UpstreamBadResponseError
from sidecar.upstreams._aiohttp import (
    check_header,
    payload_json,
    raise_for_status,
    unary_payload,
)
from sidecar.upstreams._checks import check_anthropic_messages
from sidecar.upstreams._sse import END, SKIP, Decoder, StreamingUpstream
from sidecar.upstreams.base import Chunk, UpstreamRequest, UpstreamResponse, Usage

OPERATION: Final = "messages"

# Anthropic's error types and the HTTP status each comes with (its "Errors" page); the one
# table both directions use: an `event: error` to a status, a status to a type.
ERROR_STATUS: Final[Mapping[str, int]] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
# 503 (the sidecar's own overload, open breaker, drain) reads best as overloaded too.
_TYPE_OF_STATUS: Final = {status: kind for kind, status in ERROR_STATUS.items()} | {
    503: "overloaded_error"
}
_INPUT_KEYS: Final = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (`api_error` / `invalid_request_error` for
    the 5xx / 4xx it has no name for)."""
    kind = _TYPE_OF_STATUS.get(status)
    if kind is not None:
        return kind
    return "api_error" if status >= 500 else "invalid_request_error"


def _tokens(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


def usage_of(usage: Any, input_tokens: int = 0) -> Usage | None:
    """An Anthropic `usage` object as Usage; None when absent. `input_tokens`: the input
    already known (a stream's `message_start`) for a `usage` that does not report it."""
    if not isinstance(usage, dict):
        return None
    if "input_tokens" in usage:
        input_tokens = sum(_tokens(usage.get(key)) for key in _INPUT_KEYS)
    return Usage(input_tokens, _tokens(usage.get("output_tokens")))


class _MessageEvents:
    """The decoder of one stream: each event's JSON parsed once, the input tokens of
    `message_start` carried to the usage of each `message_delta`."""

    __slots__ = ("_input", "_started", "_upstream")

    def __init__(self, upstream: AnthropicUpstream) -> None:
        self._upstream = upstream
        self._started = False
        self._input = 0

    def __call__(self, event: bytes) -> Chunk:
        up = self._upstream
        obj = up._json_object(event, 200)
        kind = obj.get("type")
        if kind == "ping":
            return SKIP
        if kind == "error":
            up._raise_event_error(obj.get("error"), event)
        if not self._started:
            if kind != "message_start":
                raise up._bad(f"the stream began with {kind!r}, not message_start")
            self._started = True
            message = obj.get("message")
            usage = usage_of(message.get("usage") if isinstance(message, dict) else None)
            self._input = usage.input_tokens if usage is not None else 0
            return Chunk(event, usage)
        if kind == "message_stop":
            return END
        if kind == "message_delta":
            return Chunk(event, usage_of(obj.get("usage"), self._input))
        if not isinstance(kind, str):
            raise up._bad("an event without a type")
        return Chunk(event)  # content blocks, and event types added later, pass as they are

    def complete(self) -> bool:
        """Only `message_stop` completes a Messages stream."""
        return False


class AnthropicUpstream(StreamingUpstream):
    """Anthropic's Messages API behind one pooled aiohttp session."""

    type = "anthropic"
    supports_stream = True
    paths = {OPERATION: "/v1/messages"}
    operations_hint = (
        f"it takes Anthropic Messages requests: operation {OPERATION!r} "
        "(POST /v1/messages on the HTTP front)"
    )
    key_header = "x-api-key"
    end_event = "message_stop"

    def _protocol_headers(self, config: Any) -> Mapping[str, str]:
        return {"anthropic-version": config.anthropic_version}

    def validate(self, request: UpstreamRequest) -> None:
        """InvalidRequestError for another operation or a body the API would refuse."""
        self._url(request.operation)
        check_anthropic_messages(request.body)
        if request.idempotency_key:
            check_header(request.idempotency_key, field="idempotency_key")

    async def call(self, request: UpstreamRequest) -> UpstreamResponse:
        """POST the payload and return the whole message with its usage."""
        url = self._url(request.operation)
        status, body = await self._fetch(url, unary_payload(request), self._headers_for(request))
        obj = self._json_object(body, status)
        usage = usage_of(obj.get("usage"))
        return UpstreamResponse(payload=body, status=status, usage=usage, body=obj)

    def _stream_request(self, request: UpstreamRequest) -> tuple[str, bytes, Decoder]:
        """The payload with `stream: true` (as sent, when it says so already)."""
        url = self._url(request.operation)
        body = request.body
        if not isinstance(body, dict):
            raise InvalidRequestError("payload must be a JSON object", field="payload")
        streaming = body.get("stream") is True
        payload = request.payload if streaming else payload_json({**body, "stream": True})
        return url, payload, _MessageEvents(self)

    def _bad(self, why: str) -> UpstreamBadResponseError:
        return UpstreamBadResponseError(
            f"upstream {self.name!r} broke the Messages stream: {why}", upstream=self.name
        )

    def _raise_event_error(self, error: Any, event: bytes) -> NoReturn:
        """An `event: error` as the error of the status its type stands for (500 unknown)."""
        kind = error.get("type") if isinstance(error, dict) else None
        status = ERROR_STATUS.get(kind, 500) if isinstance(kind, str) else 500
        raise_for_status(status, event, {}, upstream=self.name, secrets=self._secrets)
        raise AssertionError("raise_for_status returned for an error status")  # pragma: no cover
