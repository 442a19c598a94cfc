"""A fault-injecting OpenAI-compatible upstream on loopback, with exact per-endpoint counts.

Each endpoint `/e/{name}/chat/completions` has its own behaviour, switchable while a test
runs (from any thread): answer, fail the next N calls, always fail with a status, hang, or
answer slowly. It counts hits, concurrent requests and requests cancelled by the caller.
`/t/{name}` is the same endpoint as a generic JSON tool (an `http` upstream's `url`).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from tests.integration.support import serve_app

ANSWER = {
    "id": "chatcmpl-f",
    "object": "chat.completion",
    "model": "fault",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    ],
}


@dataclass
class Endpoint:
    """Behaviour and counters of one endpoint; plain attributes, set them from the test."""

    fail_status: int = 0  # every call fails with this status (0: no)
    fail_next: int = 0  # the next N calls fail with `status`
    status: int = 503
    hang: bool = False
    delay_s: float = 0.0
    usage_tokens: int = 10
    retry_after: str | None = None
    hits: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    cancelled: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _failure(self) -> int:
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return self.status
            return self.fail_status


@dataclass
class FaultServer:
    """The server; `endpoint(name)` creates or returns an endpoint."""

    endpoints: dict[str, Endpoint] = field(default_factory=dict)
    port: int = 0
    runner: web.AppRunner | None = None

    def endpoint(self, name: str) -> Endpoint:
        return self.endpoints.setdefault(name, Endpoint())

    def base_url(self, name: str) -> str:
        self.endpoint(name)
        return f"http://127.0.0.1:{self.port}/e/{name}"

    def tool_url(self, name: str) -> str:
        """The endpoint `name` as a JSON tool: POST anything, get its JSON answer."""
        self.endpoint(name)
        return f"http://127.0.0.1:{self.port}/t/{name}"

    async def handle(self, request: web.Request) -> web.Response:
        ep = self.endpoint(request.match_info["name"])
        await request.read()
        ep.hits += 1
        ep.in_flight += 1
        ep.max_in_flight = max(ep.max_in_flight, ep.in_flight)
        try:
            return await self._answer(ep)
        except asyncio.CancelledError:
            ep.cancelled += 1
            raise
        finally:
            ep.in_flight -= 1

    async def _answer(self, ep: Endpoint) -> web.Response:
        if ep.hang:
            await asyncio.sleep(3600)
        if ep.delay_s:
            await asyncio.sleep(ep.delay_s)
        status = ep._failure()
        if status:
            headers = {"Retry-After": ep.retry_after} if ep.retry_after else {}
            body = orjson.dumps({"error": {"message": f"injected {status}"}})
            return web.Response(status=status, body=body, headers=headers,
                                content_type="application/json")  # fmt: skip
        usage = {"prompt_tokens": ep.usage_tokens - 1, "completion_tokens": 1,
                 "total_tokens": ep.usage_tokens}  # fmt: skip
        return web.Response(body=orjson.dumps({**ANSWER, "usage": usage}),
                            content_type="application/json")  # fmt: skip

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/e/{name}/chat/completions", self.handle)
        app.router.add_post("/t/{name}", self.handle)
        self.runner, self.port = await serve_app(app)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
