"""A pipelining Redis connection for the scripts on the calls' path (RESP2, one socket).

redis-py takes a pooled connection per command and waits for its answer there: with 32
calls in flight that is 32 sockets, each woken on its own, and on one core it managed about
2 000 script calls a second where one pipelined socket manages over 10 000
(`bench/state_backends.py`). So the shared policies' scripts go through this connection:
each command is written as it comes (the writes of one turn of the event loop leave in one
send), and answers, which Redis returns in order, are matched to their callers in order. A
caller that gives up (its timeout) leaves its place in the line; its answer is dropped when
it arrives. When the connection breaks, every caller waiting on it gets ConnectionError and
the next command connects again. Pub/sub stays on redis-py (`store`).

Supported URLs: `redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS) and
`unix:///path[?db=N]`.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

CRLF = b"\r\n"


class ReplyError(Exception):
    """Redis answered a command with an error (`NOSCRIPT ...`, `ERR ...`)."""


class _Incomplete(Exception):
    """The buffer ends inside an answer: wait for more bytes."""


def encode(args: tuple[Any, ...]) -> bytes:
    """A command as a RESP array of bulk strings (numbers as their decimal text)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def parse(buffer: bytes | bytearray, pos: int) -> tuple[Any, int]:
    """One answer starting at `pos`: (value, position after it), or _Incomplete."""
    end = buffer.find(CRLF, pos)
    if end < 0:
        raise _Incomplete
    kind, line = buffer[pos : pos + 1], bytes(buffer[pos + 1 : end])
    pos = end + 2
    if kind == b"+":
        return line, pos
    if kind == b":":
        return int(line), pos
    if kind == b"-":
        return ReplyError(line.decode(errors="replace")), pos
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buffer) < pos + size + 2:
            raise _Incomplete
        return bytes(buffer[pos : pos + size]), pos + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = parse(buffer, pos)
            items.append(item)
        return items, pos
    raise ConnectionError(f"unexpected answer from Redis: {bytes(buffer[pos - 2 : end])!r}")


class _Protocol(asyncio.Protocol):
    """Hands the socket's events to its Connection."""

    connection: Connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.connection = Connection(cast(asyncio.Transport, transport))  # uvloop's too

    def data_received(self, data: bytes) -> None:
        self.connection._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connection._lost(exc)


class Connection:
    """One socket to Redis with any number of commands in flight (see the module)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._buffer = bytearray()
        self._out: list[bytes] = []
        self.closed = False

    def send(self, *args: Any) -> asyncio.Future[Any]:
        """Write one command; the future is its answer (ReplyError set as the exception)."""
        if self.closed:
            raise ConnectionError("the connection to Redis is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(encode(args))
        return future

    async def execute(self, *args: Any) -> Any:
        return await self.send(*args)

    def _flush(self) -> None:
        if self._out and not self.closed:
            self._transport.write(b"".join(self._out))
        self._out = []

    def _received(self, data: bytes) -> None:
        self._buffer += data
        pos = 0
        try:
            while pos < len(self._buffer):
                answer, pos = parse(self._buffer, pos)
                self._answer(answer)
        except _Incomplete:
            pass
        except ConnectionError as exc:  # not Redis speaking: give up on this socket
            del self._buffer[:pos]
            self.close(exc)
            return
        del self._buffer[:pos]

    def _answer(self, answer: Any) -> None:
        if not self._waiting:
            self.close(ConnectionError("an answer from Redis that nobody asked for"))
            return
        future = self._waiting.popleft()
        if future.done():  # its caller gave up: the answer is dropped
            return
        if isinstance(answer, ReplyError):
            future.set_exception(answer)
        else:
            future.set_result(answer)

    def _lost(self, exc: Exception | None) -> None:
        self.closed = True
        error = ConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}")
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def close(self, exc: Exception | None = None) -> None:
        if not self.closed:
            self.closed = True
            self._transport.close()
        self._lost(exc)


async def connect(url: str) -> Connection:
    """Open a connection for `url`, authenticated and on its database."""
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    protocol: _Protocol
    if parts.scheme == "unix":
        _, protocol = await loop.create_unix_connection(_Protocol, parts.path)
    else:
        tls = ssl.create_default_context() if parts.scheme == "rediss" else None
        host, port = parts.hostname or "127.0.0.1", parts.port or 6379
        _, protocol = await loop.create_connection(_Protocol, host, port, ssl=tls)
    connection = protocol.connection
    try:
        if parts.password is not None:
            user = unquote(parts.username) if parts.username else None
            secret = unquote(parts.password)
            await connection.execute(*(("AUTH", user, secret) if user else ("AUTH", secret)))
        db = _database(parts.path, parts.query, unix=parts.scheme == "unix")
        if db:
            await connection.execute("SELECT", db)
    except BaseException:
        connection.close()
        raise
    return connection


def _database(path: str, query: str, *, unix: bool) -> int:
    if unix:
        values = parse_qs(query).get("db", ["0"])
        return int(values[0])
    name = path.strip("/")
    return int(name) if name else 0


class ScriptClient:
    """Runs named Lua scripts by EVALSHA on one pipelining connection, loading a script
    Redis does not know (NOSCRIPT: after a restart, SCRIPT FLUSH) and running it again."""

    def __init__(self, url: str, scripts: dict[str, str]) -> None:
        self._url = url
        self._lua = scripts
        self._shas = {name: hashlib.sha1(lua.encode()).hexdigest() for name, lua in scripts.items()}
        self._connection: Connection | None = None
        self._connecting = asyncio.Lock()

    async def _connected(self) -> Connection:
        connection = self._connection
        if connection is None or connection.closed:
            async with self._connecting:  # concurrent first calls share one connect
                if self._connection is None or self._connection.closed:
                    self._connection = await connect(self._url)
                connection = self._connection
        return connection

    async def call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        connection = await self._connected()
        command = ("EVALSHA", self._shas[script], len(keys), *keys, *args)
        try:
            return await connection.execute(*command)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await connection.execute("SCRIPT", "LOAD", self._lua[script])
        return await connection.execute(*command)

    async def ping(self) -> None:
        await (await self._connected()).execute("PING")

    def reset(self) -> None:
        """Drop the connection (its waiting callers get ConnectionError); the next call
        connects again."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
