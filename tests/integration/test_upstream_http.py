"""HttpUpstream against real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from sidecar.config import HttpUpstreamConfig
from sidecar.errors import (
    InvalidRequestError,
    UpstreamBadResponseError,
    UpstreamClientError,
    UpstreamResponseTooLargeError,
    UpstreamUnavailableError,
)
from sidecar.upstreams.base import Upstream, UpstreamRequest
from sidecar.upstreams.http import HttpUpstream
from tests.integration.upstream_servers import (
    UpstreamServer,
    closed_port,
    closing,
    echo_authorization,
    hanging,
    resetting,
    respond,
)

KEY = "tool-key-SECRET-42"
PATH = "/tools/search"
PAYLOAD = b'{"query" :  "weather",\n "k": 3}'


def request(payload: bytes = PAYLOAD, operation: str = "search", key: str = "") -> UpstreamRequest:
    return UpstreamRequest(operation=operation, payload=payload, body=None, idempotency_key=key)


def adapter(url: str, *, limit: int = 1 << 20, api_key: str | None = KEY) -> HttpUpstream:
    config = HttpUpstreamConfig.model_validate(
        {"type": "http", "url": url, "headers": {"X-Tool": "t1"}, "max_connections": 4}
    )
    return HttpUpstream("tools", config, api_key=api_key, max_response_bytes=limit)


@pytest.fixture
async def server() -> AsyncIterator[UpstreamServer]:
    async with UpstreamServer() as srv:
        yield srv


@pytest.fixture
async def tool(server: UpstreamServer) -> AsyncIterator[HttpUpstream]:
    up = adapter(server.url + PATH)
    await up.start()
    yield up
    await up.close()


def test_adapter_satisfies_the_protocol() -> None:
    """HttpUpstream is an Upstream that does not stream."""
    up = adapter("http://127.0.0.1:1/x")
    assert isinstance(up, Upstream)
    assert (up.type, up.kind, up.supports_stream) == ("http", "tool", False)
    assert up.stats() == {}


async def test_call_sends_exact_payload_and_headers(
    server: UpstreamServer, tool: HttpUpstream
) -> None:
    """call() POSTs the payload unchanged with operation, idempotency, auth and config headers."""
    server.on(PATH, respond({"ok": True}))
    await tool.call(request(key="idem-7"))
    [seen] = server.received
    assert (seen.method, seen.path, seen.body) == ("POST", PATH, PAYLOAD)
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Tether-Operation"] == "search"
    assert seen.headers["Idempotency-Key"] == "idem-7"
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.headers["X-Tool"] == "t1"


async def test_optional_headers_are_left_out(server: UpstreamServer) -> None:
    """Without operation, idempotency key or api key, none of their headers is sent."""
    server.on(PATH, respond({"ok": True}))
    up = adapter(server.url + PATH, api_key=None)
    await up.start()
    try:
        await up.call(request(operation=""))
    finally:
        await up.close()
    headers = server.received[0].headers
    assert not {"X-Tether-Operation", "Idempotency-Key", "Authorization"} & set(headers)


@pytest.mark.parametrize("raw", [b'{"a": 1}', b"[1, 2]", b'"text"', b"42", b"null"])
async def test_any_json_answer_is_returned_raw(
    server: UpstreamServer, tool: HttpUpstream, raw: bytes
) -> None:
    """Any JSON value comes back byte for byte with its status and no usage."""
    server.on(PATH, respond(raw, status=202))
    resp = await tool.call(request())
    assert (resp.payload, resp.status, resp.usage) == (raw, 202, None)


async def test_garbage_body_is_a_bad_response(server: UpstreamServer, tool: HttpUpstream) -> None:
    """A 200 whose body is not JSON raises UpstreamBadResponseError."""
    server.on(PATH, respond(b"<html>oops</html>"))
    with pytest.raises(UpstreamBadResponseError, match="not JSON"):
        await tool.call(request())


async def test_400_is_a_client_error_with_provider_message(
    server: UpstreamServer, tool: HttpUpstream
) -> None:
    """A 400 with OpenAI-style error JSON raises UpstreamClientError with status and message."""
    server.on(PATH, respond({"error": {"message": "query too short"}}, status=400))
    with pytest.raises(UpstreamClientError) as info:
        await tool.call(request())
    assert info.value.http_status == 400
    assert info.value.message == "upstream 'tools' answered 400: query too short"


async def test_429_carries_retry_after(server: UpstreamServer, tool: HttpUpstream) -> None:
    """A 429 with Retry-After: 3 raises UpstreamClientError with retry_after_s == 3."""
    server.on(PATH, respond(b"{}", status=429, headers={"Retry-After": "3"}))
    with pytest.raises(UpstreamClientError) as info:
        await tool.call(request())
    assert info.value.retry_after_s == 3.0


async def test_retry_after_http_date(server: UpstreamServer, tool: HttpUpstream) -> None:
    """Retry-After as an HTTP-date becomes seconds from now, and a past date becomes 0."""
    soon = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    server.on(PATH, respond(b"{}", status=503, headers={"Retry-After": soon}))
    with pytest.raises(UpstreamUnavailableError) as info:
        await tool.call(request())
    assert info.value.retry_after_s is not None and 25 <= info.value.retry_after_s <= 31
    server.on(
        PATH, respond(b"{}", status=503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})
    )
    with pytest.raises(UpstreamUnavailableError) as info:
        await tool.call(request())
    assert info.value.retry_after_s == 0.0


async def test_503_is_unavailable(server: UpstreamServer, tool: HttpUpstream) -> None:
    """A 503 raises UpstreamUnavailableError with the status and no retry hint."""
    server.on(PATH, respond(b"busy", status=503))
    with pytest.raises(UpstreamUnavailableError) as info:
        await tool.call(request())
    assert (info.value.http_status, info.value.retry_after_s) == (503, None)


async def test_redirect_is_not_followed(server: UpstreamServer, tool: HttpUpstream) -> None:
    """A 3xx is not followed (the key must not travel elsewhere) and raises unavailability."""
    server.on(PATH, respond(b"", status=302, headers={"Location": "/elsewhere"}))
    with pytest.raises(UpstreamUnavailableError) as info:
        await tool.call(request())
    assert info.value.http_status == 302
    assert [seen.path for seen in server.received] == [PATH]


@pytest.mark.parametrize("handler", [resetting, closing])
async def test_reset_connection_is_unavailable(
    server: UpstreamServer, tool: HttpUpstream, handler: Any
) -> None:
    """A connection reset or closed by the server raises UpstreamUnavailableError."""
    server.on(PATH, handler)
    with pytest.raises(UpstreamUnavailableError, match="connection failed"):
        await tool.call(request())


async def test_refused_connection_is_unavailable() -> None:
    """Connecting to a closed port raises UpstreamUnavailableError."""
    up = adapter(f"http://127.0.0.1:{closed_port()}{PATH}")
    await up.start()
    try:
        with pytest.raises(UpstreamUnavailableError, match="refused"):
            await up.call(request())
    finally:
        await up.close()


async def test_response_over_limit_is_too_large(server: UpstreamServer) -> None:
    """A body over max_response_bytes raises UpstreamResponseTooLargeError."""
    server.on(PATH, respond({"blob": "x" * 3000}))
    up = adapter(server.url + PATH, limit=1000)
    await up.start()
    try:
        with pytest.raises(UpstreamResponseTooLargeError):
            await up.call(request())
    finally:
        await up.close()


async def test_large_error_body_keeps_its_status(server: UpstreamServer) -> None:
    """An error answer larger than the limit is still reported by its status, not its size."""
    server.on(PATH, respond(b"<html>" + b"x" * 200_000, status=503))
    up = adapter(server.url + PATH, limit=1000)
    await up.start()
    try:
        with pytest.raises(UpstreamUnavailableError) as info:
            await up.call(request())
    finally:
        await up.close()
    assert info.value.http_status == 503
    assert len(info.value.message) < 1100


async def test_api_key_never_leaks_into_errors(server: UpstreamServer, tool: HttpUpstream) -> None:
    """A 401 echoing the key yields an error whose text, body and metadata omit the key."""
    server.on(PATH, echo_authorization(401))
    with pytest.raises(UpstreamClientError) as info:
        await tool.call(request())
    exc = info.value
    texts = [str(exc), exc.body, repr(exc), *exc.metadata().values(), repr(tool)]
    assert all(KEY not in text for text in texts)
    assert "***" in exc.body


async def test_cancelled_call_disconnects_upstream(
    server: UpstreamServer, tool: HttpUpstream
) -> None:
    """Cancelling a call to a hanging handler makes the server see the disconnect."""
    server.on(PATH, hanging)
    task = asyncio.create_task(tool.call(request()))
    await asyncio.wait_for(server.arrived.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.disconnected.wait(), 2)


async def test_stream_is_refused(tool: HttpUpstream) -> None:
    """stream() raises InvalidRequestError naming the upstream field."""
    with pytest.raises(InvalidRequestError, match="does not stream") as info:
        async for _ in tool.stream(request()):
            pass
    assert info.value.field == "upstream"


def test_validate_refuses_header_injection() -> None:
    """validate() accepts any body but refuses control characters in header-borne values."""
    up = adapter("http://127.0.0.1:1/x")
    up.validate(request())
    with pytest.raises(InvalidRequestError) as info:
        up.validate(request(operation="a\nb"))
    assert info.value.field == "operation"
    with pytest.raises(InvalidRequestError) as info:
        up.validate(request(key="k\r\n"))
    assert info.value.field == "idempotency_key"
