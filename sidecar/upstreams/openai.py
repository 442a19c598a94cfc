"""An OpenAI-compatible API: `chat` -> `/chat/completions`, `embeddings` -> `/embeddings`.

`call` forwards the caller's payload byte for byte (a `"stream": true` is turned off, since a
unary call needs a whole answer). `stream` asks for server-sent events with usage included and
yields each event's JSON; a stream that ends without `data: [DONE]` is an error, never success.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Any

import aiohttp
import orjson

from sidecar.config import OpenAIUpstreamConfig
from sidecar.errors import InvalidRequestError, UpstreamBadResponseError, UpstreamUnavailableError
from sidecar.upstreams._aiohttp import (
    PooledUpstream,
    check_header,
    cut,
    not_json,
    provider_message,
    raise_for_status,
    redact,
    too_large,
    transport_errors,
)
from sidecar.upstreams._checks import check_messages
from sidecar.upstreams.base import Chunk, UpstreamRequest, UpstreamResponse, Usage

_CHAT = "/chat/completions"
_EMBEDDINGS = "/embeddings"
_PATHS = {"": _CHAT, "chat": _CHAT, "embeddings": _EMBEDDINGS}
_DONE = b"[DONE]"


class SSEParser:
    """Incremental `text/event-stream` parser: feed bytes, get each event's data back.

    Lines end in LF, CRLF or CR (also when split across feeds); comments and fields other
    than `data` are ignored; an event's data is its `data:` lines joined by LF.
    """

    __slots__ = ("_cr", "_data", "_line")

    def __init__(self) -> None:
        self._line = b""  # the unfinished last line
        self._data: list[bytes] = []  # `data:` values of the event being read
        self._cr = False  # the last feed ended in CR: a leading LF of the next one is its pair

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event this chunk completes, in order."""
        if self._cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        if not chunk:
            return []
        self._cr = chunk.endswith(b"\r")
        text = self._line + chunk
        if b"\r" in text:
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._line = text.split(b"\n")
        return [data for line in lines if (data := self._take(line)) is not None]

    def finish(self) -> bytes | None:
        """At end of input: the data of an event the input left unterminated, if any."""
        line, self._line = self._line, b""
        if line:
            self._take(line)
        return self._take(b"")

    def _take(self, line: bytes) -> bytes | None:
        if not line:
            data, self._data = self._data, []
            return b"\n".join(data) or None  # an event without data is not dispatched
        if line.startswith(b"data"):
            name, _, value = line.partition(b":")
            if name == b"data":
                self._data.append(value[1:] if value.startswith(b" ") else value)
        return None


def _dumps(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise InvalidRequestError(f"payload cannot be re-encoded: {exc}", field="payload") from None


def _unary_payload(request: UpstreamRequest) -> bytes:
    """The payload unchanged, unless it asks to stream: then `stream` off, no stream options."""
    body = request.body
    if not isinstance(body, dict) or not body.get("stream"):
        return request.payload
    unary = {key: value for key, value in body.items() if key != "stream_options"}
    unary["stream"] = False
    return _dumps(unary)


def _streaming_payload(body: Any) -> bytes:
    """The body with `stream: true` and `stream_options.include_usage: true` merged in."""
    if not isinstance(body, dict):
        raise InvalidRequestError("payload must be a JSON object", field="payload")
    options = body.get("stream_options")
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return _dumps({**body, "stream": True, "stream_options": merged})


class OpenAIUpstream(PooledUpstream):
    """An OpenAI-compatible HTTP API behind one pooled aiohttp session."""

    type = "openai"
    supports_stream = True

    def __init__(
        self,
        name: str,
        config: OpenAIUpstreamConfig,
        *,
        api_key: str | None,
        max_response_bytes: int,
        secret_headers: Mapping[str, str] | None = None,
    ) -> None:
        base_url = config.base_url.removesuffix("/")
        super().__init__(
            name,
            config,
            api_key=api_key,
            max_response_bytes=max_response_bytes,
            target=base_url,
            secret_headers=secret_headers,
        )
        self._urls = {operation: base_url + path for operation, path in _PATHS.items()}

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
        status, body = await self._fetch(url, _unary_payload(request), self._headers_for(request))
        obj = self._object(body, status)
        return UpstreamResponse(
            payload=body, status=status, usage=Usage.from_openai(obj.get("usage"))
        )

    async def stream(self, request: UpstreamRequest) -> AsyncGenerator[Chunk, None]:
        """POST with `stream: true` and yield each SSE event's JSON until `[DONE]`."""
        url = self._url(request.operation)
        payload = _streaming_payload(request.body)
        resp = await self._post(url, payload, self._headers_for(request))
        try:
            async with aclosing(self._chunks(resp)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except BaseException:
            resp.close()  # abort on the wire (also on aclose/cancel): the upstream sees it
            raise
        resp.release()

    def _url(self, operation: str) -> str:
        url = self._urls.get(operation)
        if url is None:
            raise InvalidRequestError(
                f"upstream {self.name!r} has no operation {operation!r}; "
                "use 'chat' or 'embeddings'",
                field="operation",
            )
        return url

    def _object(self, body: bytes, status: int) -> dict[str, Any]:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise not_json(self.name, status, body, "parse error", self._secrets) from None
        if not isinstance(obj, dict):
            raise not_json(self.name, status, body, "not an object", self._secrets)
        return obj

    async def _chunks(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[Chunk, None]:
        with transport_errors(self.name, self._secrets):
            if not 200 <= resp.status < 300:
                body = await self._read(resp)
                raise_for_status(
                    resp.status, body, resp.headers, upstream=self.name, secrets=self._secrets
                )
            parser, received = SSEParser(), 0
            async for data in resp.content.iter_any():
                received += len(data)
                if received > self._limit:
                    raise too_large(self.name, self._limit)
                for event in parser.feed(data):
                    if event == _DONE:
                        return
                    yield self._chunk(event, resp.status)
        if parser.finish() != _DONE:
            raise UpstreamBadResponseError(
                f"upstream {self.name!r}: stream ended before [DONE]", upstream=self.name
            )

    def _chunk(self, event: bytes, status: int) -> Chunk:
        obj = self._object(event, status)
        error = obj.get("error")
        if error is not None:
            reason = provider_message(error) or str(error)
            raise UpstreamUnavailableError(
                f"upstream {self.name!r} failed mid-stream: {cut(redact(reason, self._secrets))}",
                upstream=self.name,
            )
        return Chunk(data=event, usage=Usage.from_openai(obj.get("usage")))
