"""The load generator: closed-loop asyncio workers on uvloop, one call function per system.

A call function makes one call and returns the `perf_counter()` of its first chunk (for a
unary call: of its end); the worker times the whole call around it. HTTP systems (direct,
the sidecar's front, LiteLLM) share one aiohttp client, the gRPC system uses the SDK's
AsyncClient, so each proxied path is compared with the same client as its direct baseline.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import orjson

import tether

MODEL = "bench"  # the model name every HTTP system routes to the mock upstream
UPSTREAM = "llm"  # the sidecar's upstream name for the mock
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
PAYLOAD = orjson.dumps(BODY)
STREAM_PAYLOAD = orjson.dumps({**BODY, "stream": True})
JSON = {"Content-Type": "application/json"}

Call = Callable[[], Awaitable[float]]


class BadStatusError(Exception):
    """An HTTP answer other than 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@dataclass
class Samples:
    """What one load run measured: seconds per call, to the first chunk and to the end."""

    latency_s: list[float] = field(default_factory=list)
    first_chunk_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    first_error: dict[str, str] = field(default_factory=dict)  # a message per kind
    wall_s: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latency_s)

    def extend(self, other: Samples) -> None:
        self.latency_s += other.latency_s
        self.first_chunk_s += other.first_chunk_s
        self.errors.update(other.errors)
        self.first_error = {**other.first_error, **self.first_error}
        self.wall_s += other.wall_s


class Keys:
    """Journal keys: a fresh idempotency key per call, a new run id every `per_run` calls."""

    def __init__(self, prefix: str, per_run: int = 100) -> None:
        self._next = itertools.count()
        self.prefix = prefix
        self.per_run = per_run

    def take(self) -> tuple[str, str]:
        n = next(self._next)
        return f"{self.prefix}-{n // self.per_run}", f"k{n}"


async def run_load(call: Call, *, calls: int, concurrency: int, max_s: float) -> Samples:
    """`calls` calls by `concurrency` workers, stopping early once `max_s` has passed."""
    samples = Samples()
    tickets = iter(range(calls))
    perf = time.perf_counter
    start = perf()
    stop_at = start + max_s

    async def worker() -> None:
        for _ in tickets:
            begin = perf()
            try:
                first = await call()
            except Exception as exc:
                kind = type(exc).__name__
                samples.errors[kind] += 1
                samples.first_error.setdefault(kind, str(exc)[:300])
            else:
                end = perf()
                samples.latency_s.append(end - begin)
                samples.first_chunk_s.append(first - begin)
            if begin > stop_at:
                return

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    samples.wall_s = perf() - start
    return samples


def http_session() -> aiohttp.ClientSession:
    """One pooled client for every HTTP system (no connection limit: the load decides)."""
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))


def http_call(
    session: aiohttp.ClientSession,
    url: str,
    *,
    stream: bool,
    headers: dict[str, str] | None = None,
    keys: Keys | None = None,
) -> Call:
    """POST a chat completion to `url` (unary, or SSE read to the end)."""
    base = {**JSON, **(headers or {})}
    payload = STREAM_PAYLOAD if stream else PAYLOAD
    perf = time.perf_counter

    def headers_now() -> dict[str, str]:
        if keys is None:
            return base
        run_id, key = keys.take()
        return {**base, "X-Tether-Run-Id": run_id, "Idempotency-Key": key}

    async def unary() -> float:
        async with session.post(url, data=payload, headers=headers_now()) as resp:
            await resp.read()
            if resp.status != 200:
                raise BadStatusError(resp.status)
        return perf()

    async def streamed() -> float:
        first = 0.0
        async with session.post(url, data=payload, headers=headers_now()) as resp:
            if resp.status != 200:
                raise BadStatusError(resp.status)
            async for line in resp.content:
                if not first and line.startswith(b"data:"):
                    first = perf()
        return first

    return streamed if stream else unary


def grpc_call(client: tether.AsyncClient, *, stream: bool, keys: Keys | None = None) -> Call:
    """One model call through the sidecar with the SDK (unary, or a stream read to the end)."""
    payload = STREAM_PAYLOAD if stream else PAYLOAD
    perf = time.perf_counter

    def journal() -> dict[str, str]:
        if keys is None:
            return {}
        run_id, key = keys.take()
        return {"run_id": run_id, "idempotency_key": key}

    async def unary() -> float:
        await client.model(UPSTREAM, payload, **journal())
        return perf()

    async def streamed() -> float:
        first = 0.0
        async with client.stream_model(UPSTREAM, payload, **journal()) as chunks:
            async for _ in chunks:
                if not first:
                    first = perf()
        return first

    return streamed if stream else unary
