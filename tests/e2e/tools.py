"""A real tool server with side effects: it counts executions per idempotency key."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from tests.integration.support import serve_app


@dataclass
class ToolServer:
    """POST /tool executes at once; POST /slow answers after `slow_s` (time to crash).

    An execution is counted when its request arrives, before any wait: a request cut by a
    crash may have had its effect, so running a key twice shows even then.
    """

    executions: Counter[str] = field(default_factory=Counter)
    started: threading.Event = field(default_factory=threading.Event)
    slow_s: float = 30.0
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def twice(self) -> list[str]:
        """Keys executed more than once: must stay empty."""
        return [key for key, n in self.executions.items() if n > 1]

    async def _execute(self, request: web.Request) -> tuple[str, int, bytes]:
        body = await request.read()
        key = request.headers.get("Idempotency-Key", "")
        self.executions[key] += 1
        return key, self.executions[key], body

    @staticmethod
    def _answer(key: str, execution: int, body: bytes) -> web.Response:
        answer = {"key": key, "execution": execution, "echo": orjson.loads(body)}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def tool(self, request: web.Request) -> web.Response:
        return self._answer(*await self._execute(request))

    async def slow(self, request: web.Request) -> web.Response:
        executed = await self._execute(request)
        self.started.set()
        await asyncio.sleep(self.slow_s)
        return self._answer(*executed)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/tool", self.tool)
        app.router.add_post("/slow", self.slow)
        self.runner, self.port = await serve_app(app)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
