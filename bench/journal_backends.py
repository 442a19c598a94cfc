"""What each journal backend adds to a call: none, SQLite (full, normal), PostgreSQL.

    python -m bench.journal_backends [--calls 2000] [--rounds 4] [--dsn DSN]

Three sidecar processes, pinned to CPU 0 when `taskset` exists (the load generator to CPU 1;
PostgreSQL's server is not pinned), each with the built-in mock upstreams (no latency):
journal on SQLite `synchronous: full`, on SQLite `normal`, and on PostgreSQL at DSN (default
the local `test` database; the bench uses a schema of its own and drops it). `none` is the
same calls without a run id (not journaled) on the first sidecar. Two calls, each with a
fresh key:

- `model`: an idempotent upstream, journaled once, at the end (SQLite: one write, its key
  filter answers "new" without a read; PostgreSQL: one read, then one write);
- `tool`: not idempotent, a STARTED mark made durable before the call, then the answer
  (two writes).

At concurrency 1 (p50/p90/p99 in µs) and 32 (calls/s), in alternating rounds of one run.
Also reported, as the floor of what PostgreSQL can cost: one round trip (a primary-key read)
and one committed write (an autocommit INSERT, flushed to its WAL) from this process.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg.conninfo import make_conninfo

import tether
from bench.core_latency import PAYLOAD, row, throughput, timed
from bench.procs import pin_self, pinned

DSN = "postgresql://postgres@127.0.0.1:5432/test"
UPSTREAMS = {"mock": {"kind": "model", "type": "mock"}, "tool": {"kind": "tool", "type": "mock"}}
Call = Callable[[], Awaitable[object]]


def serve(
    directory: Path, journals: dict[str, dict[str, Any]], procs: list[subprocess.Popen[bytes]]
) -> dict[str, str]:
    """One sidecar per journal config (added to `procs`), ready; returns their addresses."""
    addresses = {name: f"unix:{directory}/{name}.sock" for name in journals}
    for name, journal in journals.items():
        path = directory / f"{name}.yaml"
        listen = {"grpc": addresses[name], "metrics": None}
        path.write_text(yaml.safe_dump({"listen": listen, "upstreams": UPSTREAMS,
                                        "journal": journal}))  # fmt: skip
        command = [sys.executable, "-m", "sidecar", "serve", "-c", str(path)]
        procs.append(subprocess.Popen(pinned(0, [*command, "--log-level", "WARNING"])))
    for address in addresses.values():
        with tether.Client(address) as client:
            client.wait_ready(30)
    return addresses


def cases(clients: dict[str, tether.AsyncClient]) -> dict[str, Call]:
    keys = itertools.count()

    def model(client: tether.AsyncClient) -> Call:
        return lambda: client.model(
            "mock", PAYLOAD, run_id="bench", idempotency_key=f"m{next(keys)}"
        )

    def tool(client: tether.AsyncClient) -> Call:
        return lambda: client.tool("tool", b"{}", run_id="bench", idempotency_key=f"t{next(keys)}")

    found: dict[str, Call] = {
        "model, none": lambda: clients["full"].model("mock", PAYLOAD),
        "tool, none": lambda: clients["full"].tool("tool", b"{}"),
    }
    for name, client in clients.items():
        label = name if name == "postgres" else f"sqlite {name}"
        found[f"model, {label}"] = model(client)
        found[f"tool, {label}"] = tool(client)
    return dict(sorted(found.items()))


async def measure(addresses: dict[str, str], calls: int, rounds: int) -> None:
    clients = {name: tether.AsyncClient(address) for name, address in addresses.items()}
    try:
        paths = cases(clients)
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for fn in paths.values():
            await timed(fn, 200)
        for _ in range(rounds):
            for name, fn in paths.items():
                samples[name] += await timed(fn, calls // rounds)
        print("| call, journal | p50 µs | p90 µs | p99 µs |\n| --- | --- | --- | --- |")
        for name, values in samples.items():
            print(row(name, values))
        print("\n| call, journal | calls/s at concurrency 32 |\n| --- | --- |")
        for name, fn in paths.items():
            print(f"| {name} | {await throughput(fn, calls, 32):.0f} |")
    finally:
        for client in clients.values():
            await client.close()


async def floor(dsn: str, samples: int = 400) -> None:
    """One read and one committed write from a plain client, p50 in µs."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("CREATE TABLE bench_floor (k text PRIMARY KEY, v bytea)")
        reads, writes = [], []
        for n in range(samples):
            started = time.perf_counter()
            await (
                await conn.execute("SELECT v FROM bench_floor WHERE k = %s", (str(n),))
            ).fetchall()
            reads.append((time.perf_counter() - started) * 1e6)
            started = time.perf_counter()
            await conn.execute("INSERT INTO bench_floor VALUES (%s, %s)", (str(n), b"x" * 300))
            writes.append((time.perf_counter() - started) * 1e6)
    print(f"PostgreSQL from a plain client: a read {statistics.median(reads):.0f} µs, a "
          f"committed write {statistics.median(writes):.0f} µs (p50)\n")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dsn", default=DSN, help="PostgreSQL (a schema is made and dropped)")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="tj-"))
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}".encode())
    journals = {
        "full": {"path": str(directory / "full.db"), "synchronous": "full"},
        "normal": {"path": str(directory / "normal.db"), "synchronous": "normal"},
        "postgres": {"backend": "postgres",
                     "dsn": make_conninfo(args.dsn, options=f"-c search_path={schema}")},
    }  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        addresses = serve(directory, journals, procs)
        pin_self(1)
        asyncio.run(floor(journals["postgres"]["dsn"]))
        asyncio.run(measure(addresses, args.calls, args.rounds))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE".encode())
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
