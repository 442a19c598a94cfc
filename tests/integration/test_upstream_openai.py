"""OpenAIUpstream against real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from sidecar.config import OpenAIUpstreamConfig
from sidecar.errors import (
    InvalidRequestError,
    UpstreamBadResponseError,
    UpstreamClientError,
    UpstreamError,
    UpstreamResponseTooLargeError,
    UpstreamUnavailableError,
)
from sidecar.upstreams.base import Chunk, Upstream, UpstreamRequest, Usage
from sidecar.upstreams.openai import OpenAIUpstream
from tests.integration.upstream_servers import (
    UpstreamServer,
    closed_port,
    closing,
    echo_authorization,
    hanging,
    resetting,
    respond,
    sse,
)

KEY = "sk-test-SECRET-0123456789"
CHAT_PATH = "/v1/chat/completions"
# Odd spacing on purpose: a re-serialized body would not match these bytes.
CHAT_PAYLOAD = b'{ "model" : "m",   "messages" : [ {"role":"user","content":"hi"} ] }'
COMPLETION = {
    "id": "c1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
}


def request(
    payload: bytes = CHAT_PAYLOAD, operation: str = "chat", key: str = ""
) -> UpstreamRequest:
    return UpstreamRequest(
        operation=operation, payload=payload, body=orjson.loads(payload), idempotency_key=key
    )


def adapter(base_url: str, *, limit: int = 1 << 20, api_key: str | None = KEY) -> OpenAIUpstream:
    config = OpenAIUpstreamConfig.model_validate(
        {
            "type": "openai",
            "base_url": base_url,
            "headers": {"X-Team": "agents"},
            "max_connections": 4,
        }
    )
    return OpenAIUpstream("llm", config, api_key=api_key, max_response_bytes=limit)


@pytest.fixture
async def server() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as srv:
        yield srv


@pytest.fixture
async def llm(server: UpstreamServer) -> AsyncIterator[OpenAIUpstream]:
    up = adapter(server.url + "/v1/")
    await up.start()
    yield up
    await up.close()


async def collect(up: OpenAIUpstream, req: UpstreamRequest | None = None) -> list[Chunk]:
    return [chunk async for chunk in up.stream(req or request())]


def event(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def delta(text: str) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}}], "usage": None}


def test_adapter_satisfies_the_protocol() -> None:
    """OpenAIUpstream is an Upstream with the expected static attributes."""
    up = adapter("http://127.0.0.1:1/v1")
    assert isinstance(up, Upstream)
    assert (up.type, up.kind, up.supports_stream, up.timeout_s) == ("openai", "model", True, 60.0)
    assert up.stats() == {}


async def test_call_sends_exact_payload_and_headers(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """call() POSTs the payload byte for byte with auth, config and idempotency headers."""
    server.on(CHAT_PATH, respond(COMPLETION))
    await llm.call(request(key="idem-1"))
    [seen] = server.received
    assert (seen.method, seen.path, seen.body) == ("POST", CHAT_PATH, CHAT_PAYLOAD)
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["Idempotency-Key"] == "idem-1"
    assert seen.headers["X-Team"] == "agents"


async def test_call_without_key_sends_no_idempotency_header(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """call() adds no Idempotency-Key header when the request has none."""
    server.on(CHAT_PATH, respond(COMPLETION))
    await llm.call(request())
    assert "Idempotency-Key" not in server.received[0].headers


async def test_call_returns_raw_body_status_and_usage(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """call() returns the body bytes unchanged, the status and the parsed usage."""
    raw = orjson.dumps(COMPLETION, option=orjson.OPT_INDENT_2)
    server.on(CHAT_PATH, respond(raw, status=201))
    resp = await llm.call(request())
    assert (resp.payload, resp.status, resp.usage) == (raw, 201, Usage(11, 7))


async def test_call_turns_streaming_off(server: UpstreamServer, llm: OpenAIUpstream) -> None:
    """call() of a body asking to stream sends stream false and no stream_options."""
    server.on(CHAT_PATH, respond(COMPLETION))
    body = {"model": "m", "messages": [], "stream": True, "stream_options": {"include_usage": True}}
    await llm.call(request(orjson.dumps(body)))
    assert orjson.loads(server.received[0].body) == {"model": "m", "messages": [], "stream": False}


async def test_embeddings_route_and_missing_usage(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """The embeddings operation POSTs to /embeddings; an answer without usage has usage None."""
    server.on("/v1/embeddings", respond({"data": [{"embedding": [0.1]}]}))
    payload = b'{"model":"e","input":"x"}'
    resp = await llm.call(request(payload, operation="embeddings"))
    assert server.received[0].path == "/v1/embeddings"
    assert server.received[0].body == payload
    assert resp.usage is None


@pytest.mark.parametrize(
    ("operation", "payload", "field"),
    [
        ("complete", CHAT_PAYLOAD, "operation"),
        ("chat", b"[1, 2]", "payload"),
        ("chat", b'{"model": "m"}', "payload.messages"),
        ("", b'{"messages": "hi"}', "payload.messages"),
        ("embeddings", b'{"model": "e"}', "payload.input"),
    ],
)
def test_validate_names_the_bad_field(operation: str, payload: bytes, field: str) -> None:
    """validate() raises InvalidRequestError naming the offending field."""
    up = adapter("http://127.0.0.1:1/v1")
    with pytest.raises(InvalidRequestError) as info:
        up.validate(request(payload, operation=operation))
    assert info.value.field == field


def test_validate_accepts_good_requests_and_refuses_header_injection() -> None:
    """validate() passes chat/embeddings bodies and refuses a CRLF in the idempotency key."""
    up = adapter("http://127.0.0.1:1/v1")
    up.validate(request())
    up.validate(request(b'{"input": ["a"]}', operation="embeddings"))
    with pytest.raises(InvalidRequestError) as info:
        up.validate(request(key="k\r\nX-Evil: 1"))
    assert info.value.field == "idempotency_key"


async def test_garbage_body_is_a_bad_response(server: UpstreamServer, llm: OpenAIUpstream) -> None:
    """A 200 whose body is not a JSON object raises UpstreamBadResponseError."""
    server.on(CHAT_PATH, respond(b"<html>oops</html>"))
    with pytest.raises(UpstreamBadResponseError, match="not JSON"):
        await llm.call(request())
    server.on(CHAT_PATH, respond(b"[1, 2]"))
    with pytest.raises(UpstreamBadResponseError, match="not JSON"):
        await llm.call(request())


async def test_400_is_a_client_error_with_provider_message(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """A 400 with OpenAI error JSON raises UpstreamClientError carrying status and message."""
    error = {"error": {"message": "messages must not be empty", "type": "invalid_request_error"}}
    server.on(CHAT_PATH, respond(error, status=400))
    with pytest.raises(UpstreamClientError) as info:
        await llm.call(request())
    exc = info.value
    assert exc.http_status == 400
    assert exc.upstream == "llm"
    assert exc.message == "upstream 'llm' answered 400: messages must not be empty"
    assert "invalid_request_error" in exc.body


async def test_429_carries_retry_after(server: UpstreamServer, llm: OpenAIUpstream) -> None:
    """A 429 with Retry-After: 3 raises UpstreamClientError with retry_after_s == 3."""
    server.on(CHAT_PATH, respond(b"slow down", status=429, headers={"Retry-After": "3"}))
    with pytest.raises(UpstreamClientError) as info:
        await llm.call(request())
    assert (info.value.http_status, info.value.retry_after_s) == (429, 3.0)
    assert info.value.message.endswith(": slow down")


async def test_503_is_unavailable(server: UpstreamServer, llm: OpenAIUpstream) -> None:
    """A 503 raises UpstreamUnavailableError with the status."""
    server.on(CHAT_PATH, respond(b"overloaded", status=503))
    with pytest.raises(UpstreamUnavailableError) as info:
        await llm.call(request())
    assert info.value.http_status == 503


@pytest.mark.parametrize("handler", [resetting, closing])
async def test_reset_connection_is_unavailable(
    server: UpstreamServer, llm: OpenAIUpstream, handler: Any
) -> None:
    """A connection reset or closed by the server raises UpstreamUnavailableError once."""
    server.on(CHAT_PATH, handler)
    with pytest.raises(UpstreamUnavailableError, match="connection failed"):
        await llm.call(request())
    assert len(server.received) == 1  # a POST is never silently retried


async def test_refused_connection_is_unavailable() -> None:
    """Connecting to a closed port raises UpstreamUnavailableError."""
    up = adapter(f"http://127.0.0.1:{closed_port()}/v1")
    await up.start()
    try:
        with pytest.raises(UpstreamUnavailableError, match="connection failed: refused"):
            await up.call(request())
    finally:
        await up.close()


async def test_response_over_limit_is_too_large(server: UpstreamServer) -> None:
    """A body over max_response_bytes raises UpstreamResponseTooLargeError, sized or chunked."""
    big = orjson.dumps({**COMPLETION, "pad": "x" * 5000})
    server.on(CHAT_PATH, respond(big))
    server.on("/v1/embeddings", sse([big[:3000], big[3000:]]))  # chunked: no Content-Length
    up = adapter(server.url + "/v1", limit=4096)
    await up.start()
    try:
        with pytest.raises(UpstreamResponseTooLargeError):
            await up.call(request())
        with pytest.raises(UpstreamResponseTooLargeError):
            await up.call(request(b'{"input": "x"}', operation="embeddings"))
    finally:
        await up.close()


async def test_api_key_never_leaks_into_errors(server: UpstreamServer, llm: OpenAIUpstream) -> None:
    """A 401 echoing the key yields an error whose text, body and metadata omit the key."""
    server.on(CHAT_PATH, echo_authorization(401))
    with pytest.raises(UpstreamClientError) as info:
        await llm.call(request())
    exc = info.value
    texts = [str(exc), exc.message, exc.body, repr(exc), *exc.metadata().values(), repr(llm)]
    assert all(KEY not in text for text in texts)
    assert "bad key: Bearer ***" in exc.message


async def test_cancelled_call_disconnects_upstream(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """Cancelling a call to a hanging handler makes the server see the disconnect."""
    server.on(CHAT_PATH, hanging)
    task = asyncio.create_task(llm.call(request()))
    await asyncio.wait_for(server.arrived.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.disconnected.wait(), 2)


async def test_caller_timeout_passes_through(server: UpstreamServer, llm: OpenAIUpstream) -> None:
    """The caller's asyncio.timeout surfaces as TimeoutError, not as an UpstreamError."""
    server.on(CHAT_PATH, hanging)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await llm.call(request())
    await asyncio.wait_for(server.disconnected.wait(), 2)


async def test_stream_parses_split_sse(server: UpstreamServer, llm: OpenAIUpstream) -> None:
    """stream() parses events split across writes, CRLF/CR endings, comments, multi-line data;
    the usage chunk the caller did not ask for carries the usage without data."""
    parts = [
        b": keep-alive\r\n\r\n",
        b'event: message\r\nid: 1\r\nretry: 10\r\ndata: {"choices":[{"index":0,',
        b'"delta":{"content":"He"}}],"usage":null}\r',
        b"\n\r\ndata",  # CRLF split across writes, then a field name cut in two
        b': {"choices":[{"index":0,"delta":\n',
        b'data: {"content":"llo"}}]}\n\n',
        b'data:{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\r\r',
        b"data: [DO",
        b"NE]\n\n",
    ]
    server.on(CHAT_PATH, sse(parts))
    chunks = await collect(llm)
    assert [c.data for c in chunks] == [
        b'{"choices":[{"index":0,"delta":{"content":"He"}}],"usage":null}',
        b'{"choices":[{"index":0,"delta":\n{"content":"llo"}}]}',
        b"",
    ]
    assert [c.usage for c in chunks] == [None, None, Usage(3, 2)]


async def test_stream_asks_for_usage_and_keeps_options(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """stream() sends stream true and include_usage, keeping other body keys and stream_options."""
    server.on(CHAT_PATH, sse([event(delta("x")), b"data: [DONE]\n\n"]))
    body = {"model": "m", "messages": [], "stream_options": {"other": 1, "include_usage": False}}
    await collect(llm, request(orjson.dumps(body), key="k1"))
    [seen] = server.received
    assert orjson.loads(seen.body) == {
        "model": "m",
        "messages": [],
        "stream": True,
        "stream_options": {"other": 1, "include_usage": True},
    }
    assert seen.headers["Idempotency-Key"] == "k1"
    assert seen.headers["Authorization"] == f"Bearer {KEY}"


async def test_stream_cut_before_done_is_a_bad_response(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """A stream whose body ends cleanly without [DONE] raises UpstreamBadResponseError."""
    server.on(CHAT_PATH, sse([event(delta("a")), event(delta("b"))]))
    seen: list[Chunk] = []
    with pytest.raises(UpstreamBadResponseError, match=r"before \[DONE\]"):
        async for chunk in llm.stream(request()):
            seen.append(chunk)
    assert len(seen) == 2


def finished(index: int, reason: str = "stop") -> dict[str, Any]:
    return {"choices": [{"index": index, "delta": {}, "finish_reason": reason}]}


def choice(index: int, text: str) -> dict[str, Any]:
    return {"choices": [{"index": index, "delta": {"content": text}, "finish_reason": None}]}


async def test_stream_whose_choices_all_ended_is_complete_without_done(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """`n: 2`: both choices ended with a finish_reason and the body ended cleanly, without
    [DONE]: complete, every chunk delivered."""
    parts = [choice(0, "a"), choice(1, "b"), finished(0), finished(1, "length")]
    server.on(CHAT_PATH, sse([event(part) for part in parts]))
    assert len(await collect(llm)) == 4


async def test_stream_with_a_choice_still_open_is_cut(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """`n: 2`: choice 0 ended, choice 1 did not, and the body ended: a cut, not success."""
    parts = [choice(0, "a"), choice(1, "b"), finished(0)]
    server.on(CHAT_PATH, sse([event(part) for part in parts]))
    with pytest.raises(UpstreamBadResponseError, match=r"before \[DONE\]"):
        await collect(llm)


async def test_stream_reset_midway_is_unavailable(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """A stream whose connection is reset after some events raises UpstreamUnavailableError."""
    server.on(CHAT_PATH, sse([event(delta("a"))], then="reset"))
    with pytest.raises(UpstreamUnavailableError):
        await collect(llm)


async def test_stream_done_without_blank_line_ends_cleanly(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """A final `data: [DONE]` that the body ends right after still counts as the end."""
    server.on(CHAT_PATH, sse([event(delta("a")), b"data: [DONE]"]))
    assert len(await collect(llm)) == 1


@pytest.mark.parametrize(
    ("parts", "error", "match"),
    [
        ([b"data: not json\n\n"], UpstreamBadResponseError, "not JSON"),
        ([b"data: [1]\n\n"], UpstreamBadResponseError, "not JSON"),
        (
            [event({"error": {"message": "model overloaded"}})],
            UpstreamUnavailableError,
            "overloaded",
        ),
    ],
)
async def test_stream_bad_events(
    server: UpstreamServer,
    llm: OpenAIUpstream,
    parts: list[bytes],
    error: type[UpstreamError],
    match: str,
) -> None:
    """A non-JSON event is a bad response; an error event is unavailability with its message."""
    server.on(CHAT_PATH, sse([*parts, b"data: [DONE]\n\n"]))
    with pytest.raises(error, match=match):
        await collect(llm)


async def test_stream_error_status_maps_like_call(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """A non-2xx answer to a stream raises the same errors as call()."""
    error = {"error": {"message": "rate limited"}}
    server.on(CHAT_PATH, respond(error, status=429, headers={"Retry-After": "3"}))
    with pytest.raises(UpstreamClientError, match="rate limited") as info:
        await collect(llm)
    assert info.value.retry_after_s == 3.0
    server.on(CHAT_PATH, respond(b"down", status=502))
    with pytest.raises(UpstreamUnavailableError):
        await collect(llm)


async def test_stream_over_limit_is_too_large(server: UpstreamServer) -> None:
    """A stream whose total bytes exceed max_response_bytes raises UpstreamResponseTooLargeError."""
    server.on(CHAT_PATH, sse([event(delta("x" * 600)) for _ in range(4)] + [b"data: [DONE]\n\n"]))
    up = adapter(server.url + "/v1", limit=1500)
    await up.start()
    try:
        with pytest.raises(UpstreamResponseTooLargeError):
            await collect(up)
    finally:
        await up.close()


async def test_closing_a_stream_disconnects_upstream(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """aclose() on a stream mid-way makes the server see the disconnect."""
    server.on(CHAT_PATH, sse([event(delta("a"))], then="hang"))
    chunks = llm.stream(request())
    first = await anext(chunks)
    assert first.data == orjson.dumps(delta("a"))
    await chunks.aclose()
    await asyncio.wait_for(server.disconnected.wait(), 2)


async def test_cancelled_stream_disconnects_upstream(
    server: UpstreamServer, llm: OpenAIUpstream
) -> None:
    """Cancelling the task consuming a stream makes the server see the disconnect."""
    server.on(CHAT_PATH, sse([event(delta("a"))], then="hang"))
    task = asyncio.create_task(collect(llm))
    await asyncio.wait_for(server.arrived.wait(), 2)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.disconnected.wait(), 2)


async def test_pool_reuses_connections(server: UpstreamServer, llm: OpenAIUpstream) -> None:
    """Successive calls reuse one keep-alive connection of the pool."""
    server.on(CHAT_PATH, respond(COMPLETION))
    await llm.call(request())
    await llm.call(request())
    assert len({seen.peer for seen in server.received}) == 1


async def test_unstarted_adapter_refuses_to_call() -> None:
    """Calling before start() is a programming error, reported as RuntimeError."""
    up = adapter("http://127.0.0.1:1/v1")
    with pytest.raises(RuntimeError, match="not started"):
        await up.call(request())
