"""The pipelining Redis connection: RESP encoding and parsing, answers matched in order, a
caller that gave up, a lost connection, AUTH and SELECT from the URL. A fake server on
loopback stands in for Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sidecar.state.resp import ReplyError, ScriptClient, _Incomplete, connect, encode, parse


def test_encode_numbers_and_bytes() -> None:
    """Arguments become bulk strings: text, bytes as they are, floats by repr."""
    assert encode(("EVALSHA", b"\x00", 2, 0.5)) == (
        b"*4\r\n$7\r\nEVALSHA\r\n$1\r\n\x00\r\n$1\r\n2\r\n$3\r\n0.5\r\n"
    )


@pytest.mark.parametrize(
    ("wire", "value"),
    [
        (b"+OK\r\n", b"OK"),
        (b":-42\r\n", -42),
        (b"$3\r\nabc\r\n", b"abc"),
        (b"$-1\r\n", None),
        (b"*3\r\n:1\r\n$2\r\nhi\r\n*1\r\n:0\r\n", [1, b"hi", [0]]),
    ],
)
def test_parse_each_kind(wire: bytes, value: object) -> None:
    """Simple strings, integers, bulk strings (and nil), nested arrays."""
    assert parse(wire, 0) == (value, len(wire))


def test_parse_errors_and_partial_answers() -> None:
    """An error answer is a ReplyError value; an answer cut anywhere asks for more bytes."""
    error, _ = parse(b"-NOSCRIPT No matching script\r\n", 0)
    assert isinstance(error, ReplyError) and str(error).startswith("NOSCRIPT")
    whole = b"*2\r\n:1\r\n$5\r\nhello\r\n"
    for cut in range(1, len(whole)):
        with pytest.raises(_Incomplete):
            parse(whole[:cut], 0)


class FakeRedis:
    """Answers +OK to AUTH and SELECT, the argument count to anything else, in order; holds
    its answers back while `hold` is set; records every command."""

    def __init__(self) -> None:
        self.commands: list[list[bytes]] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        buffer = b""
        while data := await reader.read(65536):
            buffer += data
            pos = 0
            while True:
                try:
                    command, pos = parse(buffer, pos)
                except _Incomplete:
                    break
                self.commands.append(command)
                await self.hold.wait()
                name = command[0].upper()
                writer.write(
                    b"+OK\r\n" if name in (b"AUTH", b"SELECT") else b":%d\r\n" % len(command)
                )
            buffer = buffer[pos:]
            await writer.drain()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for writer in self.writers:
            writer.close()
        assert self.server is not None
        self.server.close()


@pytest.fixture
async def fake() -> AsyncIterator[FakeRedis]:
    server = FakeRedis()
    await server.start()
    yield server
    await server.stop()


async def test_pipelined_answers_go_to_their_callers(fake: FakeRedis) -> None:
    """Many commands in flight on one socket: each caller gets its own answer; a caller
    that gave up leaves its place, and its answer is dropped."""
    connection = await connect(f"redis://127.0.0.1:{fake.port}")
    fake.hold.clear()
    first = connection.send("A")
    given_up = connection.send("B", 1)
    third = connection.send("C", 1, 2)
    await asyncio.sleep(0.05)
    given_up.cancel()
    fake.hold.set()
    assert await first == 1 and await third == 3
    assert [c[0] for c in fake.commands] == [b"A", b"B", b"C"]
    connection.close()


async def test_lost_connection_fails_the_waiting_callers(fake: FakeRedis) -> None:
    """When the server goes away, every waiting caller gets ConnectionError; the client
    connects again on its next call."""
    client = ScriptClient(f"redis://127.0.0.1:{fake.port}", {"s": "return 1"})
    await client.ping()
    fake.hold.clear()
    waiting = asyncio.ensure_future(client.call("s", ["k"], [1]))
    await asyncio.sleep(0.05)
    for writer in fake.writers:
        writer.close()
    with pytest.raises(ConnectionError):
        await waiting
    fake.hold.set()
    assert await client.call("s", ["k"], [1]) == 5  # EVALSHA sha 1 k 1
    client.reset()


async def test_url_gives_auth_and_database(fake: FakeRedis) -> None:
    """A password (and user) in the URL is sent with AUTH, a database other than 0 with
    SELECT, before anything else."""
    connection = await connect(f"redis://app:s%40cret@127.0.0.1:{fake.port}/3")
    connection.close()
    assert fake.commands[:2] == [[b"AUTH", b"app", b"s@cret"], [b"SELECT", b"3"]]
    fake.commands.clear()
    connection = await connect(f"redis://:pw@127.0.0.1:{fake.port}")
    connection.close()
    assert fake.commands == [[b"AUTH", b"pw"]]
