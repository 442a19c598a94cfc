"""The benchmark's HTTP load generator (`bench.load`) and mock upstream (`bench.upstream_server`)
over real loopback sockets: keep-alive, answer framing, closed and broken connections, error
statuses, stream timing, and the mock's request parsing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop

from bench import load, upstream_server
from bench.load import (
    PAYLOAD,
    STREAM_PAYLOAD,
    BadStatusError,
    HttpClient,
    Keys,
    ServerDisconnectedError,
    http_call,
    http_client,
    http_session,
    request_head,
    run_load,
)

CLOSE = object()  # a script step: the server closes the connection
Step = bytes | float | object  # bytes to write, seconds to pause, or CLOSE
OK_JSON = b'{"ok":true}'


def answer(body: bytes = OK_JSON, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


def chunked(*pieces: bytes, content_type: str = "text/event-stream") -> list[Step]:
    head = f"HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    steps: list[Step] = [head.encode()]
    steps += [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces]
    return [*steps, b"0\r\n\r\n"]


class Scripted:
    """A raw HTTP/1.1 server: the n-th request gets the n-th script (the last one repeats);
    it records each request's head and body and counts connections."""

    def __init__(self, *scripts: Sequence[Step]) -> None:
        self.scripts = scripts
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.handlers:
            task.cancel()
        await asyncio.gather(*self.handlers)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/chat/completions"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append((head, await reader.readexactly(length)))
                script = self.scripts[min(len(self.requests), len(self.scripts)) - 1]
                for step in script:
                    if step is CLOSE:
                        return
                    if isinstance(step, float):
                        await writer.drain()
                        await asyncio.sleep(step)
                    elif isinstance(step, bytes):
                        writer.write(step)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def mock() -> AsyncIterator[str]:
    """The benchmark's mock upstream in this loop; its base URL."""
    server = await upstream_server.serve()
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()


async def test_calls_reuse_one_keep_alive_connection(mock: str) -> None:
    """Sequential unary and streamed calls to the mock all travel on one connection."""
    async with http_session() as session:
        url = f"{mock}/v1/chat/completions"
        for stream in (False, True, False, True):
            call = http_call(session, url, stream=stream)
            for _ in range(5):
                assert await call() <= time.perf_counter()
        assert http_client(session).opened == 1


async def test_concurrent_calls_open_one_connection_each_and_keep_them(mock: str) -> None:
    """c workers use c connections, reused from one load run to the next."""
    async with http_session() as session:
        call = http_call(session, f"{mock}/v1/chat/completions", stream=False)
        for _ in range(2):
            samples = await run_load(call, calls=400, concurrency=8, max_s=30)
            assert samples.ok == 400 and not samples.errors
        assert http_client(session).opened == 8


async def test_content_length_and_chunked_answers_are_read_whole() -> None:
    """A Content-Length body, a chunked one in pieces split mid-chunk, an empty one and a
    body that ends with the connection all come back whole."""
    body = orjson.dumps({"text": "x" * 5000})
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    pieces: list[Step] = [head + b"6\r\nhel", 0.02, b"lo \r", 0.02, b"\n8;ext=1\r\nchunked \r\n"]
    pieces += [b"5\r", 0.02, b"\nworld\r\n0\r\nX-Trailer: 1\r\n", 0.02, b"\r\n"]
    until_close = [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end", CLOSE]
    empty = [b"HTTP/1.1 204 No Content\r\n\r\n"]
    async with Scripted([answer(body)], pieces, empty, until_close, [answer()]) as server:
        client = HttpClient()
        target, head = request_head(server.url, {}, len(PAYLOAD))
        request = head + b"\r\n" + PAYLOAD
        assert await client.exchange(target, request) == (200, 0.0, body)
        assert await client.exchange(target, request) == (200, 0.0, b"hello chunked world")
        assert await client.exchange(target, request) == (204, 0.0, b"")
        assert await client.exchange(target, request) == (200, 0.0, b"to the end")
        assert await client.exchange(target, request) == (200, 0.0, OK_JSON)
        client.close()
    assert [b for _, b in server.requests] == [PAYLOAD] * 5
    assert server.connections == 2  # the body read to the close ended the first


async def test_connection_closed_by_the_server_is_reopened_for_the_next_call() -> None:
    """`Connection: close`, or an idle connection the server drops, costs a new connection,
    not a failed call."""
    closing = [answer(extra="Connection: close\r\n"), CLOSE]
    scripted = Scripted(closing, closing, [answer(), CLOSE], [answer()])
    async with scripted as server, http_session() as session:
        call = http_call(session, server.url, stream=False)
        await call()
        await call()
        await call()
        await asyncio.sleep(0.05)  # the server's close after the 3rd call arrives
        await call()
        await call()
        assert http_client(session).opened == 4
    assert server.connections == 4 and len(server.requests) == 5


async def test_connection_broken_mid_answer_fails_the_call() -> None:
    """A connection lost before the whole answer raises ServerDisconnectedError (counted by
    run_load), without a retry; the next call opens a new connection."""
    cut = [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", 0.02, CLOSE]
    async with Scripted(cut, [answer()]) as server, http_session() as session:
        call = http_call(session, server.url, stream=False)
        samples = await run_load(call, calls=2, concurrency=1, max_s=10)
    assert samples.ok == 1
    assert samples.errors == {"ServerDisconnectedError": 1}
    assert len(server.requests) == 2 and server.connections == 2
    cut = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", CLOSE]
    with pytest.raises(ServerDisconnectedError):
        async with Scripted(cut) as server, http_session() as session:
            await http_call(session, server.url, stream=True)()


async def test_non_2xx_status_raises_bad_status_and_keeps_the_connection() -> None:
    """A 503 (body read) is BadStatusError(503) for unary and streamed calls; the connection
    stays usable."""
    refusal = [answer(b'{"error":"busy"}', "503 Service Unavailable")]
    async with Scripted(refusal, refusal, [answer()]) as server, http_session() as session:
        for stream in (False, True):
            with pytest.raises(BadStatusError) as info:
                await http_call(session, server.url, stream=stream)()
            assert info.value.status == 503
        await http_call(session, server.url, stream=False)()
        assert http_client(session).opened == 1


async def test_stream_first_chunk_is_timed_before_the_end() -> None:
    """The first chunk's time is when the first `data:` bytes came (even split over two
    reads), not when the stream ended."""
    event = b'data: {"choices":[{"delta":{"content":"ok"}}]}\n\n'
    script = chunked(b": comment\n\nda", event[2:], event, b"data: [DONE]\n\n")
    script[2:2] = [0.05]  # `da` alone first, then `ta: ...`
    script[4:4] = [0.2]  # the other events come late
    async with Scripted(script) as server, http_session() as session:
        call = http_call(session, server.url, stream=True)
        begin = time.perf_counter()
        first = await call()
        end = time.perf_counter()
    assert begin + 0.04 < first < end - 0.15
    assert orjson.loads(server.requests[0][1]) == orjson.loads(STREAM_PAYLOAD)


async def test_requests_carry_headers_journal_keys_and_length() -> None:
    """Host, the given headers (auth), Content-Length, and with `keys` a fresh idempotency
    key per call and a run id per `per_run` calls, as before."""
    async with Scripted([answer()]) as server:
        port = server.url.split(":")[2].split("/")[0]
        async with http_session() as session:
            auth = {"Authorization": "Bearer sk-x"}
            call = http_call(session, server.url, stream=False, headers=auth, keys=Keys("p", 2))
            for _ in range(3):
                await call()
            await http_call(session, server.url, stream=False)()
    heads = [dict(parse_head(head)) for head, _ in server.requests]
    for head in heads:
        assert head["host"] == f"127.0.0.1:{port}"
        assert head["content-type"] == "application/json"
        assert head["content-length"] == str(len(PAYLOAD))
    assert [h.get("idempotency-key") for h in heads] == ["k0", "k1", "k2", None]
    assert [h.get("x-tether-run-id") for h in heads] == ["p-0", "p-0", "p-1", None]
    assert [h.get("authorization") for h in heads] == ["Bearer sk-x"] * 3 + [None]
    assert server.requests[0][0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")


async def test_a_call_without_answer_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load, "TICK_S", 0.02)
    async with Scripted([5.0]) as server:
        client = HttpClient(timeout_s=0.1)
        target, head = request_head(server.url, {}, len(PAYLOAD))
        with pytest.raises(TimeoutError):
            await client.exchange(target, head + b"\r\n" + PAYLOAD)
        client.close()


def test_the_client_and_mock_on_uvloop() -> None:
    """The harness's loop: unary and streamed calls, kept alive, under load."""

    async def main() -> tuple[int, int]:
        server = await upstream_server.serve()
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/chat/completions"
        async with http_session() as session:
            ok = 0
            for stream in (False, True):
                call = http_call(session, url, stream=stream, keys=Keys("u"))
                samples = await run_load(call, calls=500, concurrency=4, max_s=30)
                assert not samples.errors, samples.first_error
                timings = zip(samples.first_chunk_s, samples.latency_s, strict=True)
                assert all(0 < first <= whole for first, whole in timings)
                ok += samples.ok
            opened = http_client(session).opened
        server.close()
        return ok, opened

    assert uvloop.run(main()) == (1000, 4)


async def test_http_call_needs_a_session_from_http_session() -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TypeError):
            http_call(session, "http://127.0.0.1:1/", stream=False)


# the mock upstream, with raw requests


def parse_head(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode().split("\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (x.partition(":") for x in lines if x)]


async def exchange_raw(url: str, data: bytes, answers: int) -> tuple[list[Any], bool]:
    """Send `data` on one connection, read `answers` answers: (status, headers, body) each;
    whether the server then closed the connection."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    found = []
    for _ in range(answers):
        head = await reader.readuntil(b"\r\n\r\n")
        headers = dict(parse_head(head))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                body += (await reader.readexactly(size + 2))[:-2]
            await reader.readuntil(b"\r\n")
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = await reader.read()
        found.append((int(head.split()[1]), headers, body))
    try:
        closed = await asyncio.wait_for(reader.read(1), 0.2) == b""
    except TimeoutError:
        closed = False
    writer.close()
    return found, closed


def post(path: str, body: bytes, *headers: str, chunks: Sequence[bytes] = ()) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: mock", *headers]
    if chunks:
        lines.append("Transfer-Encoding: chunked")
        data = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        data = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def test_mock_answers_unary_and_stream_on_one_kept_alive_connection(mock: str) -> None:
    """Unary JSON (Content-Length) and SSE (chunked), pipelined on one connection, the
    stream's request body chunked."""
    data = post("/v1/chat/completions", PAYLOAD) + post(
        "/v1/chat/completions", b"", chunks=[STREAM_PAYLOAD[:10], STREAM_PAYLOAD[10:]]
    )
    (unary, streamed), closed = await exchange_raw(mock, data, 2)
    assert not closed
    assert unary[0] == 200 and unary[1]["content-type"] == "application/json"
    assert orjson.loads(unary[2])["choices"][0]["message"]["content"] == "ok"
    assert streamed[0] == 200 and streamed[1]["content-type"] == "text/event-stream"
    events = [e for e in streamed[2].split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and all(e.startswith(b"data: ") for e in events)
    assert orjson.loads(events[0][6:])["choices"][0]["delta"]["content"] == "ok"


async def test_mock_reads_requests_split_over_many_writes(mock: str) -> None:
    host, port = mock.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    data = post("/tool", b'{"q":1}')
    for i in range(len(data)):
        writer.write(data[i : i + 1])
        await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert await reader.readexactly(7) == b'{"q":1}'
    writer.close()


async def test_mock_routes_closes_and_refuses(mock: str) -> None:
    """`/tool` echoes; unknown paths are 404, GET is 405; `Connection: close` and HTTP/1.0
    end the connection after the answer; garbage is 400."""
    found, closed = await exchange_raw(mock, post("/tool", b'{"a":2}'), 1)
    assert found[0][0] == 200 and found[0][2] == b'{"a":2}' and not closed
    found, closed = await exchange_raw(mock, post("/nope", b""), 1)
    assert found[0][0] == 404 and not closed
    get = b"GET /v1/chat/completions HTTP/1.1\r\nHost: mock\r\n\r\n"
    found, closed = await exchange_raw(mock, get, 1)
    assert found[0][0] == 405 and not closed
    data = post("/v1/chat/completions", PAYLOAD, "Connection: close")
    found, closed = await exchange_raw(mock, data, 1)
    assert found[0][0] == 200 and found[0][1]["connection"] == "close" and closed
    data = post("/v1/chat/completions", STREAM_PAYLOAD).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    found, closed = await exchange_raw(mock, data, 1)
    assert found[0][0] == 200 and found[0][2].endswith(b"data: [DONE]\n\n") and closed
    found, closed = await exchange_raw(mock, b"nonsense\r\n\r\n", 1)
    assert found[0][0] == 400 and closed
