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
    """POST /tool executes at once; POST /slow executes after `slow_s` (time to crash)."""

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

    async def tool(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get("Idempotency-Key", "")
        self.executions[key] += 1
        answer = {"key": key, "execution": self.executions[key], "echo": orjson.loads(body)}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    async def slow(self, request: web.Request) -> web.Response:
        self.started.set()
        await asyncio.sleep(self.slow_s)
        return await self.tool(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/tool", self.tool)
        app.router.add_post("/slow", self.slow)
        self.runner, self.port = await serve_app(app)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
