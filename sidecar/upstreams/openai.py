"""An OpenAI-compatible API: `chat` -> `/chat/completions`, `embeddings` -> `/embeddings`.

`call` forwards the caller's payload byte for byte (a `"stream": true` is turned off, since a
unary call needs a whole answer). `stream` asks for server-sent events with usage included and
yields each event's JSON; a stream that ends without `data: [DONE]` is an error, never success.
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
from sidecar.upstreams._checks import check_messages
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
    end_event = "[DONE]"

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
        return self._url(request.operation), _streaming_payload(request.body), self._decode

    def _decode(self, event: bytes) -> Chunk:
        if event == _DONE:
            return END
        obj = self._json_object(event, 200)
        error = obj.get("error")
        if error is not None:
            reason = provider_message(error) or str(error)
            raise UpstreamUnavailableError(
                f"upstream {self.name!r} failed mid-stream: {cut(redact(reason, self._secrets))}",
                upstream=self.name,
            )
        return Chunk(data=event, usage=Usage.from_openai(obj.get("usage")))
