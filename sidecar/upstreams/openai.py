"""An OpenAI-compatible API: `chat` -> `/chat/completions`, `embeddings` -> `/embeddings`.

`call` forwards the caller's payload byte for byte (a `"stream": true` is turned off, since a
unary call needs a whole answer). `stream` asks for server-sent events with usage included and
yields each event's JSON. A stream is complete at `data: [DONE]`, or when the body ends
cleanly after every choice it named ended with a `finish_reason` (providers and compatible
servers do omit `[DONE]`); anything else is an error, never success. The usage-only last
chunk (`choices: []`), asked for by the sidecar for its own accounting, reaches the caller
only when the caller asked for it (`stream_options.include_usage`); otherwise it is a chunk
with no data that carries the usage alone.
"""

from __future__ import annotations

from typing import Any

from sidecar.errors import InvalidRequestError, UpstreamUnavailableError
from sidecar.upstreams._aiohttp import (
    check_header,
    cut,
    payload_json,
    provider_message,
    redact,
    unary_payload,
)
from sidecar.upstreams._checks import check_messages, wants_usage
from sidecar.upstreams._sse import END, Decoder, StreamingUpstream
from sidecar.upstreams.base import Chunk, UpstreamRequest, UpstreamResponse, Usage

_CHAT = "/chat/completions"
_EMBEDDINGS = "/embeddings"
_PATHS = {"": _CHAT, "chat": _CHAT, "embeddings": _EMBEDDINGS}
_DONE = b"[DONE]"


def _streaming_payload(body: Any) -> bytes:
    """The body with `stream: true` and `stream_options.include_usage: true` merged in."""
    if not isinstance(body, dict):
        raise InvalidRequestError("payload must be a JSON object", field="payload")
    options = body.get("stream_options")
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return payload_json({**body, "stream": True, "stream_options": merged})


class OpenAIUpstream(StreamingUpstream):
    """An OpenAI-compatible HTTP API behind one pooled aiohttp session."""

    type = "openai"
    supports_stream = True
    paths = _PATHS
    operations_hint = "use 'chat' or 'embeddings'"
    end_event = "[DONE] or a finish_reason on every choice"

    def validate(self, request: UpstreamRequest) -> None:
        """InvalidRequestError for an unknown operation or a body the API would refuse."""
        self._url(request.operation)
        path = _PATHS[request.operation]
        body = request.body
        if not isinstance(body, dict):
            raise InvalidRequestError("payload must be a JSON object", field="payload")
        if path == _CHAT:
            check_messages(body.get("messages"))
        if path == _EMBEDDINGS and "input" not in body:
            raise InvalidRequestError("payload.input is required", field="payload.input")
        if request.idempotency_key:
            check_header(request.idempotency_key, field="idempotency_key")

    async def call(self, request: UpstreamRequest) -> UpstreamResponse:
        """POST the payload and return the whole JSON answer with its usage."""
        url = self._url(request.operation)
        payload = unary_payload(request, drop=("stream_options",))
        status, body = await self._fetch(url, payload, self._headers_for(request))
        obj = self._json_object(body, status)
        return UpstreamResponse(
            payload=body, status=status, usage=Usage.from_openai(obj.get("usage")), body=obj
        )

    def _stream_request(self, request: UpstreamRequest) -> tuple[str, bytes, Decoder]:
        """`stream: true` with usage included; each SSE event's JSON until `[DONE]`."""
        payload = _streaming_payload(request.body)
        decoder = _ChatEvents(self, wants_usage(request.body))
        return self._url(request.operation), payload, decoder

    def _mid_stream_error(self, error: Any) -> UpstreamUnavailableError:
        reason = provider_message(error) or str(error)
        return UpstreamUnavailableError(
            f"upstream {self.name!r} failed mid-stream: {cut(redact(reason, self._secrets))}",
            upstream=self.name,
        )


class _ChatEvents:
    """The decoder of one chat stream: each event parsed once; which choices have ended."""

    __slots__ = ("_ended", "_seen", "_upstream", "_wants_usage")

    def __init__(self, upstream: OpenAIUpstream, wants_usage: bool) -> None:
        self._upstream = upstream
        self._wants_usage = wants_usage
        self._seen: set[int] = set()  # choice indices named so far
        self._ended: set[int] = set()  # ... and those that gave a finish_reason

    def __call__(self, event: bytes) -> Chunk:
        if event == _DONE:
            return END
        up = self._upstream
        obj = up._json_object(event, 200)
        error = obj.get("error")
        if error is not None:
            raise up._mid_stream_error(error)
        usage = Usage.from_openai(obj.get("usage"))
        choices = obj.get("choices")
        if isinstance(choices, list) and choices:
            for choice in choices:
                if isinstance(choice, dict):
                    index = choice.get("index", 0)
                    index = index if isinstance(index, int) else -1
                    self._seen.add(index)
                    if choice.get("finish_reason"):
                        self._ended.add(index)
        elif usage is not None and not self._wants_usage:
            return Chunk(b"", usage)  # the usage chunk the caller did not ask for
        return Chunk(data=event, usage=usage)

    def complete(self) -> bool:
        """Every choice named so far (at least one) has ended with a finish_reason."""
        return bool(self._ended) and self._ended >= self._seen
