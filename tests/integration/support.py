"""Real servers for integration tests: an upstream on loopback and a sidecar, on a loop thread.

Both run on a background event loop in their own thread, so a test may call them with the
synchronous SDK (which blocks its own thread) or with the asyncio SDK from the test's loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from aiohttp import web

from sidecar.config import parse_config
from sidecar.server import SidecarServer, create_server

T = TypeVar("T")


async def serve_app(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve `app` on 127.0.0.1, a free port; handlers see the caller hang up (cancelled)."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


class LoopThread:
    """An event loop running in a daemon thread; `run` executes a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@dataclass
class Seen:
    """One request as the upstream received it."""

    path: str
    headers: dict[str, str]
    body: bytes


def chat_answer(body: dict[str, Any]) -> dict[str, Any]:
    text = body["messages"][-1]["content"]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": body.get("model", "m"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"echo: {text}"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    }  # fmt: skip


@dataclass
class UpstreamApp:
    """A real aiohttp upstream: OpenAI-shaped chat (unary and SSE), a JSON tool, and faults."""

    seen: list[Seen] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    hang_started: threading.Event = field(default_factory=threading.Event)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _record(self, request: web.Request) -> bytes:
        body = await request.read()
        self.seen.append(Seen(request.path, dict(request.headers), body))
        return body

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await self._record(request))
        if body.get("stream"):
            return await self._sse(request, body)
        return web.Response(body=orjson.dumps(chat_answer(body)), content_type="application/json")

    async def _sse(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        words = ["Hello", " from", " the", " stream"]
        for word in words:
            chunk = {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": word}}],
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def slow_sse(self, request: web.Request) -> web.StreamResponse:
        """Streams a chunk every 50 ms for a minute; records the caller hanging up."""
        await self._record(request)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": "x"}}],
        }
        try:
            for _ in range(1200):
                await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
                await asyncio.sleep(0.05)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled.set()
            raise
        return resp

    async def tool(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        return web.Response(body=b'{"result": ' + body + b"}", content_type="application/json")

    async def hang(self, request: web.Request) -> web.Response:
        await self._record(request)
        self.hang_started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return web.Response()  # pragma: no cover

    async def status(self, request: web.Request) -> web.Response:
        await self._record(request)
        code = int(request.match_info["code"])
        headers = {"Retry-After": "3"} if code == 429 else {}
        error = {"error": {"message": f"provider says {code}", "type": "invalid_request_error"}}
        return web.Response(status=code, body=orjson.dumps(error), headers=headers,
                            content_type="application/json")  # fmt: skip

    async def echo_auth(self, request: web.Request) -> web.Response:
        """Answers 401 quoting the credentials, as some providers do."""
        await self._record(request)
        given = request.headers.get("Authorization", "")
        error = {"error": {"message": f"Incorrect API key provided: {given}"}}
        return web.Response(status=401, body=orjson.dumps(error), content_type="application/json")

    async def embeddings(self, request: web.Request) -> web.Response:
        body = orjson.loads(await self._record(request))
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [float(len(text)), 0.5]}
                for i, text in enumerate(inputs)]  # fmt: skip
        answer = {"object": "list", "data": data, "model": body.get("model", "m"),
                  "usage": {"prompt_tokens": 2, "total_tokens": 2}}  # fmt: skip
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def garbage(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.Response(body=b"<html>oops</html>", content_type="text/html")

    async def reset(self, request: web.Request) -> web.Response:
        await self._record(request)
        assert request.transport is not None
        request.transport.abort()
        await asyncio.sleep(1)
        return web.Response()  # pragma: no cover

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/tool", self.tool)
        app.router.add_post("/slow/chat/completions", self.slow_sse)
        app.router.add_post("/hang/chat/completions", self.hang)
        app.router.add_post("/hang", self.hang)
        app.router.add_post("/status/{code}/chat/completions", self.status)
        app.router.add_post("/status/{code}", self.status)
        app.router.add_post("/garbage/chat/completions", self.garbage)
        app.router.add_post("/echo-auth/chat/completions", self.echo_auth)
        app.router.add_post("/reset/chat/completions", self.reset)
        self.runner, self.port = await serve_app(app)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def sidecar_config(socket_path: str, upstreams: dict[str, Any], **extra: Any) -> Any:
    """Listening on the socket and a loopback port; the journal beside the socket. A `listen`
    mapping in `extra` adds to (or overrides) those addresses, e.g. `{"http": "127.0.0.1:0"}`."""
    extra["journal"] = {"path": f"{socket_path}.journal.db", **extra.get("journal", {})}
    listen = {"grpc": [f"unix:{socket_path}", "127.0.0.1:0"], "metrics": None,
              **extra.pop("listen", {})}  # fmt: skip
    data = {"listen": listen, "upstreams": upstreams, **extra}
    return parse_config(data)


async def start_sidecar(config: Any) -> SidecarServer:
    server, _port = await create_server(config)
    await server.start()
    return server
