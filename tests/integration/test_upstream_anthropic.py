"""AnthropicUpstream against real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from sidecar.config import AnthropicUpstreamConfig
from sidecar.errors import UpstreamBadResponseError, UpstreamClientError, UpstreamUnavailableError
from sidecar.upstreams.anthropic import AnthropicUpstream
from sidecar.upstreams.base import Chunk, UpstreamRequest, Usage
from tests.integration.upstream_servers import UpstreamServer, respond, sse

KEY = "sk-ant-test-SECRET-0123"
PATH = "/v1/messages"
# Odd spacing on purpose: a re-serialized body would not match these bytes.
PAYLOAD = b'{ "model":"claude-x", "max_tokens": 32, "messages":[{"role":"user","content":"hi"}] }'
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 9, "output_tokens": 2}}  # fmt: skip


def event(obj: dict[str, Any]) -> bytes:
    return b"event: " + obj["type"].encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def delta(word: str) -> bytes:
    text = {"type": "text_delta", "text": word}
    return event({"type": "content_block_delta", "index": 0, "delta": text})


START = event({"type": "message_start", "message": {**MESSAGE, "content": [],
               "usage": {"input_tokens": 9, "output_tokens": 1}}})  # fmt: skip
WORDS = [delta("Hel"), delta("lo")]
FINAL = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
         "usage": {"output_tokens": 2}}  # fmt: skip
END = [event(FINAL), event({"type": "message_stop"})]
PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def request(payload: bytes = PAYLOAD) -> UpstreamRequest:
    return UpstreamRequest("messages", payload, orjson.loads(payload))


@pytest.fixture
async def server() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as srv:
        yield srv


@pytest.fixture
async def claude(server: UpstreamServer) -> AsyncIterator[AnthropicUpstream]:
    config = AnthropicUpstreamConfig.model_validate(
        {"type": "anthropic", "base_url": server.url, "headers": {"X-Team": "agents"}}
    )
    up = AnthropicUpstream("claude", config, api_key=KEY, max_response_bytes=1 << 20)
    await up.start()
    yield up
    await up.close()


async def collect(up: AnthropicUpstream) -> list[Chunk]:
    return [chunk async for chunk in up.stream(request())]


async def test_call_sends_payload_and_anthropic_headers(
    server: UpstreamServer, claude: AnthropicUpstream
) -> None:
    """call() POSTs the payload byte for byte to /v1/messages with x-api-key and
    anthropic-version, and returns the answer unchanged with its usage."""
    server.on(PATH, respond(MESSAGE))
    answer = await claude.call(request())
    [seen] = server.received
    assert (seen.path, seen.body) == (PATH, PAYLOAD)
    assert seen.headers["x-api-key"] == KEY and "Authorization" not in seen.headers
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["X-Team"] == "agents"
    assert (answer.payload, answer.usage) == (orjson.dumps(MESSAGE), Usage(9, 2))


async def test_stream_yields_events_without_ping_and_stop(
    server: UpstreamServer, claude: AnthropicUpstream
) -> None:
    """A stream yields each event's JSON but ping and message_stop; usage on the last."""
    server.on(PATH, sse([START, PING, *WORDS, *END]))
    chunks = await collect(claude)
    types = [orjson.loads(chunk.data)["type"] for chunk in chunks]
    assert types == ["message_start", "content_block_delta", "content_block_delta",
                     "message_delta"]  # fmt: skip
    assert chunks[-1].usage == Usage(9, 2)
    assert orjson.loads(server.received[0].body)["stream"] is True


async def test_stream_without_message_stop_is_an_error(
    server: UpstreamServer, claude: AnthropicUpstream
) -> None:
    """Every event but message_stop, then the end of the body: a bad response."""
    server.on(PATH, sse([START, *WORDS, END[0]]))
    with pytest.raises(UpstreamBadResponseError, match="message_stop"):
        await collect(claude)


async def test_stream_reset_midway_is_unavailable(
    server: UpstreamServer, claude: AnthropicUpstream
) -> None:
    """A connection reset after some events is UpstreamUnavailableError."""
    server.on(PATH, sse([START, WORDS[0]], then="reset"))
    with pytest.raises(UpstreamUnavailableError):
        await collect(claude)


async def test_overloaded_event_mid_stream(
    server: UpstreamServer, claude: AnthropicUpstream
) -> None:
    """`event: error` overloaded_error mid-stream is UpstreamUnavailableError 529."""
    error = event({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    server.on(PATH, sse([START, WORDS[0], error]))
    with pytest.raises(UpstreamUnavailableError) as caught:
        await collect(claude)
    assert caught.value.http_status == 529


async def test_error_statuses(server: UpstreamServer, claude: AnthropicUpstream) -> None:
    """529 with retry-after is unavailable with it; a prompt-too-long 400 is a context error."""
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    server.on(PATH, respond(overloaded, status=529, headers={"retry-after": "2"}))
    with pytest.raises(UpstreamUnavailableError) as unavailable:
        await collect(claude)
    assert (unavailable.value.http_status, unavailable.value.retry_after_s) == (529, 2.0)
    too_long = {"type": "error", "error": {"type": "invalid_request_error",
                                           "message": "prompt is too long: 9 > 8"}}  # fmt: skip
    server.on(PATH, respond(too_long, status=400))
    with pytest.raises(UpstreamClientError) as client_error:
        await claude.call(request())
    assert client_error.value.context_exceeded
    assert KEY not in str(client_error.value.metadata())


async def test_closing_a_stream_disconnects_upstream(
    server: UpstreamServer, claude: AnthropicUpstream
) -> None:
    """aclose() mid-stream makes the server see the disconnect."""
    server.on(PATH, sse([START, WORDS[0]], then="hang"))
    stream = claude.stream(request())
    assert orjson.loads((await anext(stream)).data)["type"] == "message_start"
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(server.disconnected.wait(), 2)
