"""The load generator: closed-loop asyncio workers on uvloop, one call function per system.

A call function makes one call and returns the `perf_counter()` of its first chunk (for a
unary call: of its end); the worker times the whole call around it. HTTP systems (direct,
the sidecar's front, the floor, LiteLLM) share one minimal HTTP/1.1 client (`HttpClient`:
keep-alive connections over asyncio protocols, each call's request bytes built once), the
gRPC system uses the SDK's AsyncClient, so each proxied path is compared with the same client
as its direct baseline. The client is lean on purpose: it shares the load core with the mock
upstream, and must not be what limits the calls per second.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import aiohttp
import orjson

import tether

MODEL = "bench"  # the model name every HTTP system routes to the mock upstream
UPSTREAM = "llm"  # the sidecar's upstream name for the mock
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
PAYLOAD = orjson.dumps(BODY)
STREAM_PAYLOAD = orjson.dumps({**BODY, "stream": True})
JSON = {"Content-Type": "application/json"}
KEY_HEADERS = ("X-Tether-Run-Id", "Idempotency-Key")  # the journal's, with `keys`

TIMEOUT_S = 60.0  # a call without its whole answer by then fails with TimeoutError
TICK_S = 1.0  # how often the client looks for calls past their timeout
MAX_HEAD = 64 * 1024  # status line and headers of an answer
MAX_IDLE = 256  # idle connections kept per target

Call = Callable[[], Awaitable[float]]
Target = tuple[str, int]  # host, port


class BadStatusError(Exception):
    """An HTTP answer other than 2xx."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@dataclass
class Samples:
    """What one load run measured: seconds per call, to the first chunk and to the end."""

    latency_s: list[float] = field(default_factory=list)
    first_chunk_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    first_error: dict[str, str] = field(default_factory=dict)  # a message per kind
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latency_s)

    def extend(self, other: Samples) -> None:
        self.latency_s += other.latency_s
        self.first_chunk_s += other.first_chunk_s
        self.errors.update(other.errors)
        self.first_error = {**other.first_error, **self.first_error}
        self.wall_s += other.wall_s


class Keys:
    """Journal keys: a fresh idempotency key per call, a new run id every `per_run` calls."""

    def __init__(self, prefix: str, per_run: int = 100) -> None:
        self._next = itertools.count()
        self.prefix = prefix
        self.per_run = per_run

    def take(self) -> tuple[str, str]:
        n = next(self._next)
        return f"{self.prefix}-{n // self.per_run}", f"k{n}"


async def run_load(call: Call, *, calls: int, concurrency: int, max_s: float) -> Samples:
    """`calls` calls by `concurrency` workers, stopping early once `max_s` has passed."""
    samples = Samples()
    tickets = iter(range(calls))
    perf = time.perf_counter
    start = perf()
    stop_at = start + max_s

    async def worker() -> None:
        for _ in tickets:
            begin = perf()
            try:
                first = await call()
            except Exception as exc:
                kind = type(exc).__name__
                samples.errors[kind] += 1
                samples.first_error.setdefault(kind, str(exc)[:300])
            else:
                end = perf()
                samples.latency_s.append(end - begin)
                samples.first_chunk_s.append(first - begin)
            if begin > stop_at:
                return

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    samples.wall_s = perf() - start
    return samples


class ServerDisconnectedError(ConnectionError):
    """The server closed the connection before its answer was complete."""


class HttpProtocolError(Exception):
    """An answer this client cannot read (or a stream without a `data:` event)."""


# where a connection is in reading an answer
_IDLE, _HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE = range(8)


class HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection carrying one call at a time; the answer is parsed as it
    arrives (a Content-Length, chunked or connection-close body) and read fully. For a
    stream it notes the `perf_counter()` of the first body bytes holding a `data:` event."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_lost: Callable[[HttpConnection], None]
    ) -> None:
        self.loop = loop
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.closed = False  # by either side: not to be used again
        self.waiter: asyncio.Future[None] | None = None  # the call in flight
        self.state = _IDLE
        self.buf = b""  # received, not parsed yet
        self.tick = 0  # the client's tick when the call was sent
        # the answer
        self.status = 0
        self.keep_alive = True
        self.remaining = 0  # bytes of the body (or chunk) still to come
        self.body: list[bytes] = []
        self.stream = False
        self.first = 0.0
        self.tail = b""  # the last bytes of the body so far: `data:` may straddle reads

    def send(self, request: bytes, *, stream: bool, tick: int) -> asyncio.Future[None]:
        """Write one request; the future is done once its answer was read fully."""
        assert self.transport is not None and self.waiter is None
        self.waiter = waiter = self.loop.create_future()
        self.state = _HEAD
        self.stream = stream
        self.first = 0.0
        self.tail = b""
        self.body = []
        self.tick = tick
        self.transport.write(request)
        return waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def fail(self, exc: BaseException) -> None:
        """End the call in flight with `exc` and drop the connection."""
        waiter, self.waiter, self.state = self.waiter, None, _IDLE
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.abort()

    def finish(self) -> None:
        waiter, self.waiter, self.state = self.waiter, None, _IDLE
        if not self.keep_alive:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:  # bytes nobody asked for
            self.abort()
            return
        buf = self.buf + data if self.buf else data
        try:
            self.buf = self.parse(buf)
        except HttpProtocolError as exc:
            self.buf = b""
            self.fail(exc)

    def eof_received(self) -> bool | None:
        self.closed = True
        return None  # close the transport: connection_lost ends a call in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None:
            if self.state == _UNTIL_CLOSE:
                self.finish()
            else:
                why = f": {exc}" if exc else ""
                self.fail(ServerDisconnectedError(f"connection closed mid-answer{why}"))
        self.on_lost(self)

    # parsing

    def parse(self, buf: bytes) -> bytes:
        """Consume what `buf` holds of the answer; what is left for later."""
        while True:
            state = self.state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise HttpProtocolError("answer head too large")
                    return buf
                self.head(buf[:end])
                buf = buf[end + 4 :]
            elif state in (_BODY, _CHUNK_DATA):
                if not buf:
                    return buf
                piece = buf[: self.remaining]
                self.got(piece)
                self.remaining -= len(piece)
                buf = buf[len(piece) :]
                if self.remaining:
                    return buf
                if state == _BODY:
                    self.finish()
                else:
                    self.state = _CHUNK_END
            elif state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > MAX_HEAD:
                        raise HttpProtocolError("chunk size line too long")
                    return buf
                try:
                    size = int(buf[:eol].split(b";", 1)[0], 16)
                except ValueError:
                    raise HttpProtocolError(f"bad chunk size {buf[:eol][:40]!r}") from None
                if size < 0:
                    raise HttpProtocolError("negative chunk size")
                buf = buf[eol + 2 :]
                self.remaining = size
                self.state = _CHUNK_DATA if size else _TRAILER
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return buf
                if buf[:2] != b"\r\n":
                    raise HttpProtocolError("chunk not followed by CRLF")
                buf = buf[2:]
                self.state = _CHUNK_SIZE
            elif state == _TRAILER:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return buf
                buf = buf[eol + 2 :]
                if eol == 0:  # the empty line after the trailer fields
                    self.finish()
            elif state == _UNTIL_CLOSE:
                if buf:
                    self.got(buf)
                return b""
            else:  # _IDLE: bytes past the end of the answer; it stands, the connection goes
                if buf:
                    self.close()
                return b""

    def head(self, head: bytes) -> None:
        """The status line and headers: how the body is framed."""
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1.") or not rest[:3].isdigit():
            raise HttpProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(rest[:3])
        keep_alive = version == b"HTTP/1.1"
        length = -1
        chunked = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise HttpProtocolError(f"bad header line {line[:80]!r}")
            name = name.strip().lower()
            if name == b"content-length":
                value = value.strip()
                if not value.isdigit():
                    raise HttpProtocolError(f"bad Content-Length {value[:40]!r}")
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"connection":
                tokens = value.lower()
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        if 100 <= status < 200:
            if status == 101:
                raise HttpProtocolError("unexpected 101 Switching Protocols")
            return  # an interim answer (100 Continue): the real one follows
        self.status = status
        self.keep_alive = keep_alive
        if status in (204, 304):
            self.finish()
        elif chunked:
            self.state = _CHUNK_SIZE
        elif length > 0:
            self.remaining = length
            self.state = _BODY
        elif length == 0:
            self.finish()
        else:  # the body ends with the connection
            self.keep_alive = False
            self.state = _UNTIL_CLOSE

    def got(self, piece: bytes) -> None:
        """Body bytes."""
        self.body.append(piece)
        if self.stream and not self.first:
            if b"data:" in (self.tail + piece if self.tail else piece):
                self.first = time.perf_counter()
            else:
                self.tail = piece[-4:]


class HttpClient:
    """Keep-alive HTTP/1.1 connections per target (host, port), reused last in, first out.

    A connection carries one call at a time, so there are as many as calls in flight (the
    load decides, as with aiohttp's unlimited pool before). A connection the server closed
    (keep-alive ended, `Connection: close`, a body read to the connection's end) is dropped
    and the next call opens a new one; one that breaks during a call fails that call with
    ServerDisconnectedError: no silent retry. A call without its whole answer within
    `timeout_s` fails with TimeoutError.
    """

    def __init__(self, *, timeout_s: float = TIMEOUT_S, max_idle: int = MAX_IDLE) -> None:
        self.timeout_ticks = max(1, math.ceil(timeout_s / TICK_S))
        self.max_idle = max_idle
        self.idle: dict[Target, list[HttpConnection]] = {}
        self.connections: set[HttpConnection] = set()  # every open one
        self.opened = 0  # connections opened so far
        self.tick = 0
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False

    async def connect(self, target: Target) -> HttpConnection:
        if self.closed:
            raise RuntimeError("the HTTP client is closed")
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: HttpConnection(loop, self.connections.discard), *target
        )
        self.connections.add(conn)
        self.opened += 1
        if self.timer is None:
            self.timer = loop.call_later(TICK_S, self.sweep)
        return conn

    async def exchange(
        self, target: Target, request: bytes, *, stream: bool = False
    ) -> tuple[int, float, bytes]:
        """Send `request` (whole, with its body) and read the answer: status, the
        `perf_counter()` of the first `data:` bytes (0.0 if none or not a stream), body."""
        conn = None
        idle = self.idle.get(target)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                break
            conn = None
        if conn is None:
            conn = await self.connect(target)
        try:
            await conn.send(request, stream=stream, tick=self.tick)
        except BaseException:
            conn.abort()
            raise
        found = conn.status, conn.first, b"".join(conn.body)
        conn.body = []
        if conn.closed or self.closed:
            conn.close()
        else:
            idle = self.idle.setdefault(target, [])
            if len(idle) < self.max_idle:
                idle.append(conn)
            else:
                conn.close()
        return found

    def sweep(self) -> None:
        """Fail the calls past their timeout; again in a tick."""
        self.tick += 1
        oldest = self.tick - self.timeout_ticks
        late = [c for c in self.connections if c.waiter is not None and c.tick <= oldest]
        for conn in late:
            conn.fail(TimeoutError(f"no whole answer within {self.timeout_ticks * TICK_S:.0f} s"))
        self.timer = asyncio.get_running_loop().call_later(TICK_S, self.sweep)

    def close(self) -> None:
        """Close every connection (calls in flight fail)."""
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.idle.clear()
        for conn in list(self.connections):
            conn.close()


def request_head(url: str, headers: dict[str, str], length: int) -> tuple[Target, bytes]:
    """Where to send a POST to `url`, and its request line and headers up to the blank line
    (not included): Host, `headers` and Content-Length."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"the load generator speaks plain http:// only, not {url!r}")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"POST {path} HTTP/1.1"]
    if not any(name.lower() == "host" for name in headers):
        lines.append(f"Host: {parts.netloc.rpartition('@')[2]}")
    framing = ("content-length", "transfer-encoding")
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in framing]
    lines.append(f"Content-Length: {length}")
    return (parts.hostname, parts.port or 80), ("\r\n".join(lines) + "\r\n").encode("latin-1")


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, also owning the run's HttpClient: closing the session closes it."""

    def __init__(self) -> None:
        super().__init__(limit=0, force_close=False)
        self.client = HttpClient()

    async def close(self, *, abort_ssl: bool = False) -> None:
        self.client.close()
        await super().close(abort_ssl=abort_ssl)


def http_session() -> aiohttp.ClientSession:
    """The run's HTTP client, as an aiohttp session (the start-up probes use it as one): the
    calls of `http_call` go through the HttpClient it carries, closed with the session."""
    return aiohttp.ClientSession(connector=_Connector(), timeout=aiohttp.ClientTimeout(total=60))


def http_client(session: aiohttp.ClientSession) -> HttpClient:
    """The HttpClient of a session made by `http_session`."""
    connector = session.connector
    if not isinstance(connector, _Connector):
        raise TypeError("http_call needs a session made by bench.load.http_session()")
    return connector.client


def http_call(
    session: aiohttp.ClientSession,
    url: str,
    *,
    stream: bool,
    headers: dict[str, str] | None = None,
    keys: Keys | None = None,
) -> Call:
    """POST a chat completion to `url` (unary, or SSE read to the end) with the session's
    HttpClient. With `keys`, each call carries a fresh run id and idempotency key. An answer
    other than 2xx raises BadStatusError (once read); a stream's first chunk is the first
    body bytes holding a `data:` event."""
    client = http_client(session)
    payload = STREAM_PAYLOAD if stream else PAYLOAD
    base = {**JSON, **(headers or {})}
    if keys is not None:
        dropped = {name.lower() for name in KEY_HEADERS}
        base = {k: v for k, v in base.items() if k.lower() not in dropped}
    target, head = request_head(url, base, len(payload))
    whole = head + b"\r\n" + payload
    exchange = client.exchange
    perf = time.perf_counter

    def request() -> bytes:
        if keys is None:
            return whole
        run_id, key = keys.take()
        journal = f"{KEY_HEADERS[0]}: {run_id}\r\n{KEY_HEADERS[1]}: {key}\r\n\r\n"
        return head + journal.encode() + payload

    async def unary() -> float:
        status, _, _ = await exchange(target, request())
        if not 200 <= status < 300:
            raise BadStatusError(status)
        return perf()

    async def streamed() -> float:
        status, first, _ = await exchange(target, request(), stream=True)
        if not 200 <= status < 300:
            raise BadStatusError(status)
        if not first:
            raise HttpProtocolError("the stream ended without a data: event")
        return first

    return streamed if stream else unary


def grpc_call(client: tether.AsyncClient, *, stream: bool, keys: Keys | None = None) -> Call:
    """One model call through the sidecar with the SDK (unary, or a stream read to the end)."""
    payload = STREAM_PAYLOAD if stream else PAYLOAD
    perf = time.perf_counter

    def journal() -> tuple[str, str]:
        """The call's run id and key, or none (empty: not journaled)."""
        return keys.take() if keys is not None else ("", "")

    async def unary() -> float:
        run_id, key = journal()
        await client.model(UPSTREAM, payload, run_id=run_id, idempotency_key=key)
        return perf()

    async def streamed() -> float:
        first = 0.0
        run_id, key = journal()
        stream = client.stream_model(UPSTREAM, payload, run_id=run_id, idempotency_key=key)
        async with stream as chunks:
            async for _ in chunks:
                if not first:
                    first = perf()
        return first

    return streamed if stream else unary
