"""SDK -> sidecar -> real aiohttp upstream on loopback, sync and async, unary and streaming."""

from __future__ import annotations

import asyncio
import contextlib
import time

import orjson
import pytest

import tether
from sidecar.server import SidecarServer
from tests.integration.support import UpstreamApp

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def test_sync_model_call_passes_payload_exactly(address: str, upstream: UpstreamApp) -> None:
    """A sync model call reaches the upstream byte for byte and returns its answer and usage."""
    with tether.Client(address) as client:
        result = client.model("llm", CHAT)
    assert [s.path for s in upstream.seen] == ["/v1/chat/completions"]
    assert upstream.seen[0].body == orjson.dumps(CHAT)
    assert result.json()["choices"][0]["message"]["content"] == "echo: hi"
    assert (result.usage.input_tokens, result.usage.output_tokens) == (7, 3)
    assert (result.upstream, result.upstream_status, result.attempts) == ("llm", 200, 1)


async def test_async_model_call_over_tcp(sidecar: SidecarServer, upstream: UpstreamApp) -> None:
    """The asyncio client over loopback TCP gets the same answer; raw bytes pass unchanged."""
    raw = b'{"messages": [{"role": "user", "content": "raw"}],   "model": "x"}'
    async with tether.AsyncClient(sidecar.addresses[1]) as client:
        result = await client.model("llm", raw)
    assert upstream.seen[0].body == raw
    assert result.json()["choices"][0]["message"]["content"] == "echo: raw"


def test_sync_tool_call(address: str, upstream: UpstreamApp) -> None:
    """A tool call POSTs the payload to the tool URL with its name and key as headers."""
    with tether.Client(address) as client:
        result = client.tool("search", {"q": "tether"}, name="web_search", idempotency_key="k1")
    seen = upstream.seen[0]
    assert (seen.path, seen.body) == ("/tool", b'{"q":"tether"}')
    assert seen.headers["X-Tether-Operation"] == "web_search"
    assert seen.headers["Idempotency-Key"] == "k1"
    assert result.json() == {"result": {"q": "tether"}}


async def test_async_tool_call(address: str, upstream: UpstreamApp) -> None:
    """The asyncio client's tool call returns the tool's JSON body."""
    async with tether.AsyncClient(address) as client:
        result = await client.tool("search", [1, 2, 3])
    assert upstream.seen[0].body == b"[1,2,3]"
    assert result.json() == {"result": [1, 2, 3]}


def test_sync_stream(address: str, upstream: UpstreamApp) -> None:
    """A streamed call yields the upstream's chunks in order, then its usage."""
    with tether.Client(address) as client:
        stream = client.stream_model("llm", CHAT)
        chunks = list(stream)
    sent = orjson.loads(upstream.seen[0].body)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert text == "Hello from the stream"
    assert stream.summary.usage.total_tokens == 9
    assert stream.summary.upstream == "llm"


async def test_async_stream(address: str) -> None:
    """The asyncio client streams the same chunks: the words, not the usage chunk the caller
    did not ask for (its usage is in the summary); asked for, it comes last."""
    async with tether.AsyncClient(address) as client:
        stream = client.stream_model("llm", CHAT)
        chunks = [c async for c in stream]
        assert len(chunks) == 4 and all(c["choices"] for c in chunks)
        assert stream.summary.done and stream.summary.usage.output_tokens == 4
        asked = {**CHAT, "stream_options": {"include_usage": True}}
        chunks = [c async for c in client.stream_model("llm", asked)]
    assert len(chunks) == 5 and chunks[-1] == {"choices": [], "usage": chunks[-1]["usage"]}
    assert chunks[-1]["usage"]["completion_tokens"] == 4


def test_run_handle_sends_run_and_keys(address: str, upstream: UpstreamApp) -> None:
    """A run handle forwards run-derived idempotency keys to the upstream."""
    with tether.Client(address) as client:
        run = client.run("run-7")
        run.model("llm", CHAT)
        run.tool("search", {})
    keys = [s.headers.get("Idempotency-Key") for s in upstream.seen]
    assert keys == ["run-7:1", "run-7:2"]


def test_status_reports_counters_and_hits(address: str) -> None:
    """GetStatus shows calls, errors, in-flight and the mock's hit counter."""
    with tether.Client(address) as client:
        client.model("mock", CHAT)
        client.model("mock", CHAT)
        with contextlib.suppress(tether.UpstreamError):
            client.model("broken", CHAT)
        status = client.status()
    assert status.serving and status.config_version
    assert (status.upstreams["mock"].calls, status.upstreams["mock"].hits) == (2, 2)
    assert (status.upstreams["broken"].calls, status.upstreams["broken"].errors) == (1, 1)
    assert status.upstreams["llm"].kind == "model" and status.upstreams["search"].kind == "tool"
    assert status.in_flight == 0


def test_leaving_a_stream_early_cancels_the_upstream(address: str, upstream: UpstreamApp) -> None:
    """Breaking out of a stream cancels the call, and the sidecar hangs up on the upstream."""
    with tether.Client(address) as client:
        stream = client.stream_model("slow-stream", CHAT)
        for n, _chunk in enumerate(stream):
            if n == 1:
                break
        assert upstream.cancelled.wait(2), "the upstream kept streaming"
        deadline = time.monotonic() + 2
        while client.status().in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.status().in_flight == 0


async def test_async_stream_context_cancels_upstream(address: str, upstream: UpstreamApp) -> None:
    """Leaving `async with stream` early cancels the upstream request at once."""
    async with tether.AsyncClient(address) as client:
        async with client.stream_model("slow-stream", CHAT) as stream:
            async for _chunk in stream:
                break
        assert await asyncio.to_thread(upstream.cancelled.wait, 2)


def test_stream_cut_midway_is_an_error(address: str) -> None:
    """A stream that fails after some chunks raises, with the chunks already delivered."""
    with tether.Client(address) as client:
        seen = []
        with pytest.raises(tether.DeadlineExceededError):
            for chunk in client.stream_model("slow-stream", CHAT, timeout_s=0.3):
                seen.append(chunk)
    assert len(seen) >= 2  # chunks arrived before the deadline cut the stream
