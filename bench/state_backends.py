"""What shared state costs a call: `state.backend: memory` vs `redis`, at concurrency 1 and 32.

    python -m bench.state_backends [--calls 2000] [--rounds 4] [--redis redis://127.0.0.1:6379/0]

Starts two sidecars (each its own process, pinned to CPU 0 when `taskset` exists; this
process on CPU 1), identical but for `state`: both proxy the built-in mock upstream (no
network, no latency) through a rate limit (requests and tokens, high enough never to refuse)
and a breaker; one keeps them in memory, the other in Redis. Then, in alternating rounds so
that drift hits both alike, it measures each call's latency through the SDK sequentially and
with 32 callers at once, plus the calls per second at 32. Also reported: one EVALSHA round
trip from this process, the floor of what a shared policy can cost.

Per call the redis backend makes one script round trip before the call (the rate limit's
admission, which also carries the token settlements of earlier calls); the breaker of a
healthy upstream costs none.
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
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio
import yaml

import tether
from bench.procs import free_port, pin_self, pinned

BODY = {"model": "bench", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
PAYLOAD = orjson.dumps(BODY)
POLICIES = {
    "retry": None,
    "rate_limit": {"requests_per_s": 1_000_000, "tokens_per_min": 1_000_000_000},
    "breaker": {"fail_max": 5},
}


def start(
    tmp: Path, name: str, state: dict[str, Any], metrics: str
) -> tuple[subprocess.Popen[bytes], str]:
    address = f"unix:{tmp}/{name}.sock"
    config = {
        "listen": {"grpc": address, "metrics": metrics},
        "upstreams": {"llm": {"kind": "model", "type": "mock", "policies": POLICIES}},
        "journal": {"backend": "none"},
        "state": state,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "sidecar", "serve", "-c", str(path)]
    proc = subprocess.Popen(pinned(0, [*command, "--log-level", "WARNING"]))
    with tether.Client(address) as client:
        client.wait_ready(30)
    return proc, address


async def sequential(client: tether.AsyncClient, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        await client.model("llm", PAYLOAD)
        out.append((time.perf_counter() - started) * 1e6)
    return out


async def concurrent(
    client: tether.AsyncClient, calls: int, callers: int
) -> tuple[list[float], float]:
    """Latencies (µs) of `calls` calls made by `callers` at once, and the calls per second."""
    out: list[float] = []

    async def caller() -> None:
        for _ in range(calls // callers):
            started = time.perf_counter()
            await client.model("llm", PAYLOAD)
            out.append((time.perf_counter() - started) * 1e6)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return out, len(out) / (time.perf_counter() - started)


async def script_round_trip(url: str, calls: int) -> list[float]:
    """One EVALSHA of a script that reads the server's TIME, from this process."""
    client = redis.asyncio.Redis.from_url(url)
    script = client.register_script("local t = redis.call('TIME') return t[2]")
    out = []
    try:
        await script()
        for _ in range(calls):
            started = time.perf_counter()
            await script()
            out.append((time.perf_counter() - started) * 1e6)
    finally:
        await client.aclose()
    return out


def pct(samples: list[float], p: int) -> float:
    return statistics.quantiles(samples, n=100)[p - 1]


def incidents(metrics: str) -> str:
    """The store incidents a sidecar counted (a store answer later than timeout_s)."""
    text = urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5).read().decode()
    found = [line.split()[-1] for line in text.splitlines()
             if line.startswith("tether_store_incidents_total")]  # fmt: skip
    return found[0] if found else "0"


async def measure(addresses: dict[str, str], url: str, calls: int, rounds: int) -> None:
    seq: dict[str, list[float]] = {name: [] for name in addresses}
    par: dict[str, list[float]] = {name: [] for name in addresses}
    rates: dict[str, list[float]] = {name: [] for name in addresses}
    clients = {name: tether.AsyncClient(address) for name, address in addresses.items()}
    try:
        for client in clients.values():  # warm up: connections, scripts loaded
            await sequential(client, 200)
            await concurrent(client, 640, 32)
        for _ in range(rounds):
            for name, client in clients.items():
                seq[name] += await sequential(client, calls // rounds)
                latencies, rate = await concurrent(client, 2 * calls // rounds, 32)
                par[name] += latencies
                rates[name].append(rate)
    finally:
        for client in clients.values():
            await client.close()
    evalsha = await script_round_trip(url, calls)
    print("| backend | c=1 p50 µs | c=1 p90 µs | c=1 p99 µs | c=32 p50 µs | c=32 p99 µs "
          "| calls/s at c=32 |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in addresses:
        print(f"| {name} | {statistics.median(seq[name]):.0f} | {pct(seq[name], 90):.0f} "
              f"| {pct(seq[name], 99):.0f} | {statistics.median(par[name]):.0f} "
              f"| {pct(par[name], 99):.0f} | {statistics.median(rates[name]):.0f} |")  # fmt: skip
    med = statistics.median
    c1_p50, c1_p99 = (
        med(seq["redis"]) - med(seq["memory"]),
        pct(seq["redis"], 99) - pct(seq["memory"], 99),
    )
    c32_p50, c32_rate = (
        med(par["redis"]) - med(par["memory"]),
        med(rates["redis"]) / med(rates["memory"]),
    )
    print(f"\nadded by redis: c=1 p50 {c1_p50:+.0f} µs, p99 {c1_p99:+.0f} µs; c=32 p50 "
          f"{c32_p50:+.0f} µs, throughput {c32_rate - 1:+.0%}")  # fmt: skip
    print(f"one EVALSHA round trip from a client: p50 {statistics.median(evalsha):.0f} µs, "
          f"p99 {pct(evalsha, 99):.0f} µs")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    # A store answer later than timeout_s starts an incident (the calls are then limited
    # locally): 1 s, so that a saturated sidecar's own queueing does not count as the store's.
    states = {"memory": {"backend": "memory"},
              "redis": {"backend": "redis", "url": args.redis, "key_prefix": prefix,
                        "timeout_s": 1.0}}  # fmt: skip
    procs = []
    metrics = {name: f"127.0.0.1:{free_port()}" for name in states}
    with tempfile.TemporaryDirectory(prefix="tb-") as tmp:
        try:
            addresses = {}
            for name, state in states.items():
                proc, addresses[name] = start(Path(tmp), name, state, metrics[name])
                procs.append(proc)
            pin_self(1)
            asyncio.run(measure(addresses, args.redis, args.calls, args.rounds))
            print(f"store incidents during the run: {incidents(metrics['redis'])}")
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                proc.wait(20)
            client = redis.Redis.from_url(args.redis)
            keys = list(client.scan_iter(match=f"{prefix}:*"))
            if keys:
                client.delete(*keys)
            client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
