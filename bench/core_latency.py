"""A first, rough latency figure for the sidecar core (the full harness comes later).

    python -m bench.core_latency [--calls 2000]

Starts an instant upstream (`bench.upstream_server`) and a sidecar, each in its own process
(the sidecar pinned to CPU 0, the rest to CPU 1 when `taskset` exists), then measures, in one
run and alternating A/B rounds:

- `direct-http`: aiohttp -> upstream;            `sidecar-openai`: SDK -> sidecar -> upstream;
- `mock-inproc`: MockUpstream.call in-process;   `sidecar-mock`: SDK -> sidecar's built-in mock;
- `httpx` vs `aiohttp` as the pooled upstream client, sequential and at concurrency 32.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import httpx
import orjson
import yaml

import tether
from bench.procs import pin_self, pinned
from sidecar.config import MockUpstreamConfig
from sidecar.upstreams.base import UpstreamRequest
from sidecar.upstreams.mock import MockUpstream

BODY = {"model": "bench", "messages": [{"role": "user", "content": "hi"}]}
PAYLOAD = orjson.dumps(BODY)


async def timed(fn: Callable[[], Awaitable[object]], calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - start) * 1e6)
    return out


async def throughput(fn: Callable[[], Awaitable[object]], calls: int, concurrency: int) -> float:
    per_worker = calls // concurrency

    async def worker() -> None:
        for _ in range(per_worker):
            await fn()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return per_worker * concurrency / (time.perf_counter() - start)


def start_processes(tmp: Path) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], str, str]:
    up = subprocess.Popen(
        pinned(1, [sys.executable, "-m", "bench.upstream_server"]), stdout=subprocess.PIPE
    )
    assert up.stdout is not None
    url = f"http://127.0.0.1:{int(up.stdout.readline())}"
    address = f"unix:{tmp}/bench.sock"
    config = {
        "listen": {"grpc": address, "metrics": None},
        "upstreams": {
            "llm": {"kind": "model", "type": "openai", "base_url": f"{url}/v1"},
            "mock": {"kind": "model", "type": "mock"},
        },
    }
    (tmp / "c.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "sidecar", "serve", "-c", str(tmp / "c.yaml")]
    sidecar = subprocess.Popen(pinned(0, [*command, "--log-level", "WARNING"]))
    with tether.Client(address) as client:
        client.wait_ready(20)
    return up, sidecar, url, address


def row(name: str, samples: list[float]) -> str:
    q = statistics.quantiles(samples, n=100)
    return f"| {name} | {statistics.median(samples):.0f} | {q[89]:.0f} | {q[98]:.0f} |"


async def measure(url: str, address: str, calls: int, rounds: int) -> None:
    mock = MockUpstream("m", MockUpstreamConfig(type="mock", kind="model"))
    request = UpstreamRequest("chat", PAYLOAD, BODY)
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        httpx.AsyncClient(limits=httpx.Limits(max_connections=100)) as hx,
        tether.AsyncClient(address) as client,
    ):

        async def direct() -> object:
            async with session.post(
                f"{url}/v1/chat/completions", data=PAYLOAD, headers=headers
            ) as r:
                return await r.read()

        async def via_httpx() -> object:
            r = await hx.post(f"{url}/v1/chat/completions", content=PAYLOAD, headers=headers)
            return r.content

        cases: dict[str, Callable[[], Awaitable[object]]] = {
            "direct-http (aiohttp)": direct,
            "direct-http (httpx)": via_httpx,
            "sidecar-openai": lambda: client.model("llm", PAYLOAD),
            "mock-inproc": lambda: mock.call(request),
            "sidecar-mock": lambda: client.model("mock", PAYLOAD),
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for fn in cases.values():  # warm up
            await timed(fn, 200)
        for _ in range(rounds):  # alternate A/B so drift hits every case alike
            for name, fn in cases.items():
                samples[name] += await timed(fn, calls // rounds)
        print("| path | p50 µs | p90 µs | p99 µs |\n| --- | --- | --- | --- |")
        for name, values in samples.items():
            print(row(name, values))
        print("\n| path | calls/s at concurrency 32 |\n| --- | --- |")
        for name in (
            "direct-http (aiohttp)",
            "direct-http (httpx)",
            "sidecar-openai",
            "sidecar-mock",
        ):
            print(f"| {name} | {await throughput(cases[name], calls, 32):.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tb-") as tmp:
        up, sidecar, url, address = start_processes(Path(tmp))
        try:
            pin_self(1)
            asyncio.run(measure(url, address, args.calls, args.rounds))
        finally:
            sidecar.send_signal(signal.SIGTERM)
            sidecar.wait(20)
            up.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
