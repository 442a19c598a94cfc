"""A fault-injecting streaming OpenAI-compatible upstream on loopback, with per-endpoint counts.

Each endpoint `/s/{name}/chat/completions` streams server-sent events in its own `mode`,
switchable while a test runs:

- `ok`: every word as a chunk, a usage chunk, then `data: [DONE]`;
- `cut`: `chunks` words, then the connection is closed (aborted) mid-answer;
- `stall`: `chunks` words, then silence (the connection stays open);
- `slow_first`: headers, then the whole `ok` answer after `delay_s`;
- `no_done`: every word and the usage chunk, then EOF without `[DONE]`;
- `malformed`: `chunks` words, then an event that is not JSON, then the rest and `[DONE]`;
- `status`: an error answer with `status`, OpenAI's error JSON (`error_code`, `message`) and
  `Retry-After: retry_after` when set;
- `reset`: the connection is aborted before any answer;
- `silent`: headers, then nothing at all.

`times` limits the mode to the next N requests (then `ok`); `hits` counts every request.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.integration.support import serve_app

WORDS = ["Hello", " from", " the", " faulty", " stream"]
TEXT = "".join(WORDS)
USAGE = {"prompt_tokens": 5, "completion_tokens": len(WORDS), "total_tokens": 5 + len(WORDS)}
GARBAGE = b"{this is not json"


def _event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def word_chunk(word: str, model: str) -> bytes:
    return _event({"id": "chatcmpl-s", "object": "chat.completion.chunk", "model": model,
                   "choices": [{"index": 0, "delta": {"content": word}}]})  # fmt: skip


@dataclass
class StreamEndpoint:
    """Behaviour and counters of one endpoint; plain attributes, set them from the test."""

    mode: str = "ok"
    times: int | None = None  # the mode applies to the next N requests only, then `ok`
    chunks: int = 2  # words sent before a cut, stall or malformed event
    delay_s: float = 0.0  # slow_first: the wait before the first chunk
    status: int = 503
    retry_after: str | None = None
    error_code: str | None = None
    message: str = "injected failure"
    model: str = "fault-model"
    hits: int = 0
    hit_times: list[float] = field(default_factory=list)

    def _take_mode(self) -> str:
        if self.times is None:
            return self.mode
        if self.times > 0:
            self.times -= 1
            return self.mode
        return "ok"


@dataclass
class StreamFaultServer:
    """The server; `endpoint(name)` creates or returns an endpoint."""

    endpoints: dict[str, StreamEndpoint] = field(default_factory=dict)
    port: int = 0
    runner: web.AppRunner | None = None

    def endpoint(self, name: str) -> StreamEndpoint:
        return self.endpoints.setdefault(name, StreamEndpoint())

    def base_url(self, name: str) -> str:
        self.endpoint(name)
        return f"http://127.0.0.1:{self.port}/s/{name}"

    async def arrived(
        self, request: web.Request, ep: StreamEndpoint
    ) -> tuple[str, web.StreamResponse | None]:
        """Count a request and take its mode; the answer already, for `status` and `reset`."""
        ep.hits += 1
        ep.hit_times.append(time.monotonic())
        mode = ep._take_mode()
        if mode == "status":
            return mode, self._status(ep)
        if mode == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
            return mode, web.Response()  # pragma: no cover
        return mode, None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ep = self.endpoint(request.match_info["name"])
        await request.read()
        mode, answer = await self.arrived(request, ep)
        if answer is not None:
            return answer
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if mode == "silent":
            await asyncio.sleep(3600)
        if mode == "slow_first":
            await asyncio.sleep(ep.delay_s)
        before_fault = ep.chunks if mode in ("cut", "stall", "malformed") else len(WORDS)
        for word in WORDS[:before_fault]:
            await resp.write(word_chunk(word, ep.model))
        if mode == "cut":
            await asyncio.sleep(0.05)  # let the words leave before the connection dies
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
            return resp  # pragma: no cover
        if mode == "stall":
            await asyncio.sleep(3600)
        if mode == "malformed":
            await resp.write(b"data: " + GARBAGE + b"\n\n")
            for word in WORDS[before_fault:]:
                await resp.write(word_chunk(word, ep.model))
        await resp.write(_event({"id": "chatcmpl-s", "object": "chat.completion.chunk",
                                 "model": ep.model, "choices": [], "usage": USAGE}))  # fmt: skip
        if mode != "no_done":
            await resp.write(b"data: [DONE]\n\n")
        return resp

    def _status(self, ep: StreamEndpoint) -> web.Response:
        headers = {"Retry-After": ep.retry_after} if ep.retry_after else {}
        error = {"message": ep.message, "type": "invalid_request_error", "param": None,
                 "code": ep.error_code}  # fmt: skip
        return web.Response(status=ep.status, body=orjson.dumps({"error": error}),
                            headers=headers, content_type="application/json")  # fmt: skip

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/s/{name}/chat/completions", self.handle)
        self.runner, self.port = await serve_app(app)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
