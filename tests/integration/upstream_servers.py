"""Real aiohttp web servers on 127.0.0.1 for the upstream adapter tests.

`UpstreamServer` answers every path with the handler registered for it, records what each
request carried, and notices when a client disconnects while a handler is still running.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Received:
    """One request as the server saw it."""

    method: str
    path: str
    headers: CIMultiDictProxy[str]
    body: bytes
    peer: Any  # the client's (host, port): one per connection


class UpstreamServer:
    """An aiohttp server on an ephemeral loopback port with per-path handlers."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.arrived = asyncio.Event()  # a request reached its handler
        self.disconnected = asyncio.Event()  # a handler was cancelled: the client went away
        self.url = ""
        self._handlers: dict[str, Handler] = {}
        self._runner: web.AppRunner | None = None

    def on(self, path: str, handler: Handler) -> None:
        self._handlers[path] = handler

    async def __aenter__(self) -> UpstreamServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.received.append(Received(request.method, request.path, request.headers, body, peer))
        self.arrived.set()
        handler = self._handlers.get(request.path)
        if handler is None:
            return web.Response(status=404, text="no handler")
        try:
            return await handler(request)
        except asyncio.CancelledError:
            self.disconnected.set()
            raise


def respond(
    body: bytes | Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Handler:
    """A handler answering `body` (bytes as is, anything else as JSON)."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=raw, status=status, headers=headers, content_type="application/json"
        )

    return handler


def sse(parts: list[bytes], *, then: str = "end", pause_s: float = 0.005) -> Handler:
    """A chunked text/event-stream handler writing `parts` one network write at a time.

    `then`: "end" finishes the body cleanly, "hang" waits forever, "reset" aborts the socket.
    """

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in parts:
            await resp.write(part)
            await asyncio.sleep(pause_s)
        if then == "hang":
            await asyncio.Event().wait()
        if then == "reset":
            reset(request)
            await asyncio.Event().wait()
        await resp.write_eof()
        return resp

    return handler


def reset(request: web.Request) -> None:
    """Abort the request's connection with a TCP RST (SO_LINGER 0)."""
    transport = request.transport
    assert transport is not None
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def resetting(request: web.Request) -> web.StreamResponse:
    """A handler that resets the connection instead of answering."""
    reset(request)
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def closing(request: web.Request) -> web.StreamResponse:
    """A handler that closes the connection instead of answering."""
    assert request.transport is not None
    request.transport.close()
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def hanging(request: web.Request) -> web.StreamResponse:
    """A handler that never answers."""
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def echo_authorization(status: int) -> Handler:
    """A handler that answers `status` with the request's Authorization header in the body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        seen = request.headers.get("Authorization", "")
        error = {"error": {"message": f"bad key: {seen}", "type": "invalid_request_error"}}
        return web.json_response(error, status=status, headers={"X-Echo": "yes"})

    return handler


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
