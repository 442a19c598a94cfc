"""A fault-injecting upstream speaking Anthropic's Messages API on loopback, per-endpoint counts.

Each endpoint's API root is `/a/{name}` (so `POST /a/{name}/v1/messages`). A unary request is
answered with a `message`; a streamed one (`"stream": true`) with Anthropic's events:
`message_start`, `content_block_start`, a `ping`, one `content_block_delta` per word,
`content_block_stop`, `message_delta` with usage, `message_stop`. The endpoint's `mode`
(switchable while a test runs; `times` limits it to the next N requests) is one of:

- `ok`: the whole answer;
- `cut`: `chunks` words, then the connection is aborted mid-answer;
- `stall`: `chunks` words, then silence (the connection stays open);
- `slow_first`: headers, then the whole answer after `delay_s`;
- `no_stop`: every event but `message_stop`, then the end of the body;
- `malformed`: `chunks` words, then an event that is not JSON, then the rest;
- `error_event`: `chunks` words, then `event: error` of `error_type` (in-band, after a 200);
- `error_first`: `event: error` of `error_type` as the stream's first event;
- `status`: an error answer with `status`, Anthropic's error JSON (`error_type`, `message`)
  and `retry-after: retry_after` when set;
- `reset`: the connection is aborted before any answer;
- `silent`: headers, then nothing at all (a unary request: no answer at all).

A request whose last message is the assistant's (a prefill) is answered with the rest of
the answer after it, as Claude continuing its own words would; a prefill that ends in white
space is refused with a 400, as the API does.

Every request's headers and JSON body are kept in `requests`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.integration.provider import continuing, prefill_of
from tests.integration.stream_faults import GARBAGE, WORDS, StreamEndpoint, StreamFaultServer
from tests.integration.support import serve_app

INPUT_TOKENS = 12
USAGE = {"input_tokens": INPUT_TOKENS, "output_tokens": len(WORDS)}


def event(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def message(model: str, text: str) -> dict[str, Any]:
    return {"id": "msg_test", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": USAGE}  # fmt: skip


def word(text: str) -> bytes:
    delta = {"type": "text_delta", "text": text}
    return event({"type": "content_block_delta", "index": 0, "delta": delta})


def request_body(ep: MessagesEndpoint) -> dict[str, Any]:
    return ep.requests[-1][1]


def _continuing(prefill: str | None, words: list[str]) -> list[str]:
    """The answer's words after `prefill` (all of them without one)."""
    if prefill is None:
        return words
    rest = continuing("".join(words), prefill)
    return [rest[: len(rest) // 2], rest[len(rest) // 2 :]]


def error_event(kind: str, text: str) -> bytes:
    return event({"type": "error", "error": {"type": kind, "message": text}})


@dataclass
class MessagesEndpoint(StreamEndpoint):
    """An endpoint's behaviour and what it received; set the attributes from the test."""

    model: str = "claude-test"
    error_type: str = "overloaded_error"
    words: list[str] = field(default_factory=lambda: list(WORDS))  # the answer, word by word
    requests: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)


@dataclass
class MessagesFaultServer(StreamFaultServer):
    """The server; `endpoint(name)` creates or returns an endpoint, `base_url(name)` is its
    API root for `base_url` of an `anthropic` upstream."""

    endpoints: dict[str, MessagesEndpoint] = field(default_factory=dict)  # type: ignore[assignment]

    def endpoint(self, name: str) -> MessagesEndpoint:
        return self.endpoints.setdefault(name, MessagesEndpoint())

    def base_url(self, name: str) -> str:
        self.endpoint(name)
        return f"http://127.0.0.1:{self.port}/a/{name}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ep = self.endpoint(request.match_info["name"])
        body = orjson.loads(await request.read())
        ep.requests.append((dict(request.headers), body))
        mode, answer = await self.arrived(request, ep)
        if answer is not None:
            return answer
        prefill = prefill_of(body)
        if prefill is not None and prefill != prefill.rstrip():
            error = {
                "type": "invalid_request_error",
                "message": "final assistant content cannot end with trailing whitespace",
            }
            return web.Response(status=400, body=orjson.dumps({"type": "error", "error": error}),
                                content_type="application/json")  # fmt: skip
        if not body.get("stream"):
            if mode == "silent":
                await asyncio.sleep(3600)
            return web.json_response(message(ep.model, "".join(WORDS)))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await self._events(request, resp, ep, mode)
        return resp

    async def _events(
        self, request: web.Request, resp: web.StreamResponse, ep: MessagesEndpoint, mode: str
    ) -> None:
        if mode == "silent":
            await asyncio.sleep(3600)
        if mode == "slow_first":
            await asyncio.sleep(ep.delay_s)
        if mode == "error_first":
            await resp.write(error_event(ep.error_type, ep.message))
            return
        start = {**message(ep.model, ""), "content": [], "stop_reason": None,
                 "usage": {"input_tokens": INPUT_TOKENS, "output_tokens": 1}}  # fmt: skip
        await resp.write(event({"type": "message_start", "message": start}))
        block = {"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}}  # fmt: skip
        await resp.write(event(block) + b'event: ping\ndata: {"type": "ping"}\n\n')
        faulty = mode in ("cut", "stall", "malformed", "error_event")
        words = _continuing(prefill_of(request_body(ep)), ep.words)
        before_fault = ep.chunks if faulty else len(words)
        for text in words[:before_fault]:
            await resp.write(word(text))
        if mode == "cut":
            await asyncio.sleep(0.05)  # let the words leave before the connection dies
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        if mode == "stall":
            await asyncio.sleep(3600)
        if mode == "error_event":
            await resp.write(error_event(ep.error_type, ep.message))
            return
        if mode == "malformed":
            await resp.write(b"event: content_block_delta\ndata: " + GARBAGE + b"\n\n")
            for text in words[before_fault:]:
                await resp.write(word(text))
        final = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                 "usage": {"output_tokens": len(WORDS)}}  # fmt: skip
        await resp.write(event({"type": "content_block_stop", "index": 0}) + event(final))
        if mode != "no_stop":
            await resp.write(event({"type": "message_stop"}))

    def _status(self, ep: MessagesEndpoint) -> web.Response:  # type: ignore[override]
        headers = {"retry-after": ep.retry_after} if ep.retry_after else {}
        error = {"type": "error", "error": {"type": ep.error_type, "message": ep.message}}
        return web.Response(status=ep.status, body=orjson.dumps(error), headers=headers,
                            content_type="application/json")  # fmt: skip

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/a/{name}/v1/messages", self.handle)
        self.runner, self.port = await serve_app(app)
