"""Streams of server-sent events from an upstream: an incremental parser, and the base class
of the adapters that stream (`openai`, `anthropic`).

A streaming adapter is an HTTP API under a `base_url` with a path per operation (`paths`), and
implements `_stream_request`: the URL, the payload, and a decoder, a
callable that turns the data of one event into a `Chunk` for the caller, or returns `END`
(the protocol's last event: the stream is complete) or `SKIP` (an event with nothing for the
caller, such as a keep-alive ping). The decoder parses each event once and raises
`UpstreamError` for one that breaks the protocol. A body that ends cleanly before `END` is
complete only when the decoder says the answer itself ended (`complete()`: OpenAI's
`finish_reason` on every choice, where `data: [DONE]` may be missing); else it is an error,
never a complete answer. An event left unterminated at the end of the body is not dispatched
(as the SSE standard says), except the protocol's last event.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Mapping
from contextlib import aclosing
from typing import Final, Protocol

import aiohttp

from sidecar.config import AnthropicUpstreamConfig, OpenAIUpstreamConfig
from sidecar.errors import InvalidRequestError, UpstreamBadResponseError
from sidecar.upstreams._aiohttp import PooledUpstream, raise_for_status, too_large, transport_errors
from sidecar.upstreams.base import Chunk, UpstreamRequest

END: Final = Chunk(b"")  # the stream's last event arrived: it is complete
SKIP: Final = Chunk(b"")  # an event that carries nothing for the caller


class Decoder(Protocol):
    """The events of one stream, decoded one at a time."""

    def __call__(self, event: bytes) -> Chunk:
        """The chunk for the caller, or END or SKIP."""
        ...

    def complete(self) -> bool:
        """Whether the answer has ended, so that a clean end of the body completes it."""
        ...


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


class StreamingUpstream(PooledUpstream, ABC):
    """A pooled adapter of an API under `base_url` whose streamed answers are server-sent
    events."""

    paths: Mapping[str, str] = {}  # operation -> path under base_url
    operations_hint = ""  # what the operation should be, for the error naming another one
    key_header = "Authorization"  # where the API key travels (Authorization: Bearer KEY)
    end_event = "its last event"  # what a complete stream ends with, named in errors

    def __init__(
        self,
        name: str,
        config: OpenAIUpstreamConfig | AnthropicUpstreamConfig,
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
            key_header=self.key_header,
            protocol_headers=self._protocol_headers(config),
        )
        self._urls = {operation: base_url + path for operation, path in self.paths.items()}

    def _protocol_headers(
        self, config: OpenAIUpstreamConfig | AnthropicUpstreamConfig
    ) -> Mapping[str, str]:
        """Headers the API requires on every request (the config's may override them)."""
        return {}

    def _url(self, operation: str) -> str:
        url = self._urls.get(operation)
        if url is None:
            raise InvalidRequestError(
                f"upstream {self.name!r} has no operation {operation!r}; {self.operations_hint}",
                field="operation",
            )
        return url

    @abstractmethod
    def _stream_request(self, request: UpstreamRequest) -> tuple[str, bytes, Decoder]:
        """The URL, the payload and a fresh decoder of one streamed call (each API's own)."""

    async def stream(self, request: UpstreamRequest) -> AsyncGenerator[Chunk, None]:
        """POST, then yield the decoded chunk of each event until the decoder says END."""
        url, payload, decode = self._stream_request(request)
        resp = await self._post(url, payload, self._headers_for(request))
        try:
            async with aclosing(self._events(resp, decode)) as chunks:
                async for chunk in chunks:
                    yield chunk
        except BaseException:
            resp.close()  # abort on the wire (also on aclose/cancel): the upstream sees it
            raise
        resp.release()

    async def _events(
        self, resp: aiohttp.ClientResponse, decode: Decoder
    ) -> AsyncGenerator[Chunk, None]:
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
                    chunk = decode(event)
                    if chunk is END:
                        return
                    if chunk is not SKIP:
                        yield chunk
        tail = parser.finish()
        if decode.complete() or (tail is not None and decode(tail) is END):
            return
        raise UpstreamBadResponseError(
            f"upstream {self.name!r}: stream ended before {self.end_event}", upstream=self.name
        )
