"""An instant OpenAI-compatible upstream for benchmarks: `python -m bench.upstream_server`.

Answers `POST /v1/chat/completions` (a chat completion, or an SSE stream when the body asks
`"stream": true`) and `POST /tool` (echoes the body) at once, with fixed bodies. A bare
asyncio Protocol speaking HTTP/1.1, so that the mock costs little of the load core: keep-alive
(several requests per connection, pipelined ones too), request bodies framed by
Content-Length or `Transfer-Encoding: chunked`, prebuilt responses (Content-Length; the
stream chunked). Prints its port on stdout when ready.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import cast

CHAT = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}'
)
CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"bench",'
    b'"choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n'
)
USAGE = (
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}\n\n'
)
EVENTS = CHUNK + CHUNK + USAGE + b"data: [DONE]\n\n"

MAX_HEAD = 64 * 1024  # request line and headers
MAX_BODY = 16 * 1024 * 1024
CHAT_PATH = b"/v1/chat/completions"
TOOL_PATH = b"/tool"


def response(status: bytes, content_type: bytes, body: bytes, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 response with a Content-Length body."""
    head = b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
    return head % (status, content_type, len(body), extra) + body


def closing(answer: bytes) -> bytes:
    """`answer` with a `Connection: close` header."""
    return answer.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)


CHAT_ANSWER = response(b"200 OK", b"application/json", CHAT)
STREAM_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n" % len(EVENTS)
    + EVENTS
    + b"\r\n0\r\n\r\n"
)
# HTTP/1.0 knows no chunks: the stream ends with the connection
STREAM_ANSWER_HTTP10 = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + EVENTS
)
TEXT = b"text/plain; charset=utf-8"
NOT_FOUND = response(b"404 Not Found", TEXT, b"404: Not Found")
NOT_ALLOWED = response(
    b"405 Method Not Allowed", TEXT, b"405: Method Not Allowed", b"Allow: POST\r\n"
)
BAD_REQUEST = closing(response(b"400 Bad Request", TEXT, b"400: Bad Request"))
TOO_LARGE = closing(response(b"413 Request Entity Too Large", TEXT, b"413: Too Large"))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BadRequestError(Exception):
    """A request this server cannot read; it answers 400 (or `answer`) and closes."""

    def __init__(self, message: str, answer: bytes = BAD_REQUEST) -> None:
        super().__init__(message)
        self.answer = answer


def dechunk(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    """The chunked body starting at `buf[pos]` and the offset after it; None if incomplete."""
    parts: list[bytes] = []
    total = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > MAX_HEAD:
                raise BadRequestError("chunk size line too long")
            return None
        try:
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
        except ValueError:
            raise BadRequestError("bad chunk size") from None
        if size < 0:
            raise BadRequestError("bad chunk size")
        pos = eol + 2
        if size == 0:
            while True:  # trailer fields, up to an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return None
                if eol == pos:
                    return b"".join(parts), pos + 2
                pos = eol + 2
        total += size
        if total > MAX_BODY:
            raise BadRequestError("body too large", TOO_LARGE)
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise BadRequestError("chunk not followed by CRLF")
        parts.append(buf[pos : pos + size])
        pos += size + 2


def answer(method: bytes, path: bytes, body: bytes, http10: bool) -> bytes:
    """The prebuilt response to one request."""
    path = path.split(b"?", 1)[0]
    if path == CHAT_PATH:
        if method != b"POST":
            return NOT_ALLOWED
        if b'"stream":true' not in body.replace(b" ", b""):
            return CHAT_ANSWER
        return STREAM_ANSWER_HTTP10 if http10 else STREAM_ANSWER
    if path == TOOL_PATH:
        if method != b"POST":
            return NOT_ALLOWED
        return response(b"200 OK", b"application/json", body)
    return NOT_FOUND


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: requests in, prebuilt answers out, in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.continued = False  # sent `100 Continue` for the request being received

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        try:
            while buf:
                used = self.one(buf)
                if used == 0:
                    break
                if used < 0:  # answered, then closed
                    buf = b""
                    break
                buf = buf[used:]
        except BadRequestError as exc:
            assert self.transport is not None
            self.transport.write(exc.answer)
            self.transport.close()
            buf = b""
        self.buf = buf

    def one(self, buf: bytes) -> int:
        """Answer the request at the start of `buf`: the bytes it took, 0 if it is incomplete,
        -1 if the connection closes after it."""
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise BadRequestError("request head too large")
            return 0
        lines = buf[:end].split(b"\r\n")
        try:
            method, target, version = lines[0].split(b" ")
        except ValueError:
            raise BadRequestError("bad request line") from None
        if version not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise BadRequestError("unsupported HTTP version")
        http10 = version == b"HTTP/1.0"
        keep_alive = not http10
        length = 0
        chunked = expect = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise BadRequestError("bad header line")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise BadRequestError("bad Content-Length") from None
                if length < 0:
                    raise BadRequestError("bad Content-Length")
                if length > MAX_BODY:
                    raise BadRequestError("body too large", TOO_LARGE)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                token = value.strip().lower()
                if token == b"close":
                    keep_alive = False
                elif token == b"keep-alive":
                    keep_alive = True
            elif name == b"expect":
                expect = value.strip().lower() == b"100-continue"
        start = end + 4
        if chunked:
            found = dechunk(buf, start)
            if found is None:
                self.maybe_continue(expect)
                return 0
            body, used = found
        else:
            used = start + length
            if len(buf) < used:
                self.maybe_continue(expect)
                return 0
            body = buf[start:used]
        self.continued = False
        assert self.transport is not None
        reply = answer(method, target, body, http10)
        if keep_alive:
            self.transport.write(reply)
            return used
        self.transport.write(reply if reply is STREAM_ANSWER_HTTP10 else closing(reply))
        self.transport.close()
        return -1

    def maybe_continue(self, expect: bool) -> None:
        if expect and not self.continued:
            assert self.transport is not None
            self.transport.write(CONTINUE)
            self.continued = True


async def serve(host: str = "127.0.0.1", port: int = 0) -> asyncio.Server:
    """The upstream listening on `host:port` (0: any free port)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(UpstreamProtocol, host, port, backlog=1024)


async def main(port: int) -> None:
    server = await serve(port=port)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.port))
    except ImportError:
        asyncio.run(main(args.port))
