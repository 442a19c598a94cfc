"""What the journal costs: calls through the sidecar with the journal off versus on.

    python -m bench.journal_cost [--calls 2000] [--dir DIR]

Two sidecar processes (pinned to CPU 0 when `taskset` exists; the load generator to CPU 1),
each with the built-in mock upstream (no latency) and a journal in DIR: one with
`synchronous: full`, one with `normal`. In one run, alternating A/B rounds, it measures:

- `journal off`: calls without a run id (not journaled) on the `full` sidecar;
- `journal full` / `journal normal`: calls with a run id and a fresh key each (one journal
  write each, group-committed);
- the cost of one fsync of a small write on DIR's disk, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import yaml

import tether
from bench.core_latency import PAYLOAD, row, throughput, timed
from bench.machine import fsync_ms
from bench.procs import pin_self, pinned


def start_sidecar(
    directory: Path, name: str, synchronous: str
) -> tuple[subprocess.Popen[bytes], str]:
    address = f"unix:{directory}/{name}.sock"
    config = {
        "listen": {"grpc": address, "metrics": None},
        "upstreams": {"mock": {"kind": "model", "type": "mock"}},
        "journal": {"path": str(directory / f"{name}.db"), "synchronous": synchronous},
    }
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "sidecar", "serve", "-c", str(directory / f"{name}.yaml")]
    proc = subprocess.Popen(pinned(0, [*command, "--log-level", "WARNING"]))
    with tether.Client(address) as client:
        client.wait_ready(20)
    return proc, address


async def measure(full: str, normal: str, calls: int, rounds: int) -> None:
    keys = itertools.count()
    async with tether.AsyncClient(full) as a, tether.AsyncClient(normal) as b:

        def journaled(client: tether.AsyncClient) -> Callable[[], Awaitable[object]]:
            return lambda: client.model(
                "mock", PAYLOAD, run_id="bench", idempotency_key=f"k{next(keys)}"
            )

        cases: dict[str, Callable[[], Awaitable[object]]] = {
            "journal off": lambda: a.model("mock", PAYLOAD),
            "journal full": journaled(a),
            "journal normal": journaled(b),
        }
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for fn in cases.values():
            await timed(fn, 200)
        for _ in range(rounds):
            for name, fn in cases.items():
                samples[name] += await timed(fn, calls // rounds)
        print("| path | p50 µs | p90 µs | p99 µs |\n| --- | --- | --- | --- |")
        for name, values in samples.items():
            print(row(name, values))
        print("\n| path | calls/s at concurrency 32 |\n| --- | --- |")
        for name, fn in cases.items():
            print(f"| {name} | {await throughput(fn, calls, 32):.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dir", help="where the journals live (default: a temporary directory)")
    args = parser.parse_args()
    directory = Path(args.dir or tempfile.mkdtemp(prefix="tj-"))
    directory.mkdir(parents=True, exist_ok=True)
    fsync_us = fsync_ms(directory)["p50"] * 1000
    print(f"fsync of a 512-byte write on {directory}: median {fsync_us:.0f} µs\n")
    procs = []
    try:
        full_proc, full = start_sidecar(directory, "full", "full")
        normal_proc, normal = start_sidecar(directory, "normal", "normal")
        procs = [full_proc, normal_proc]
        pin_self(1)
        asyncio.run(measure(full, normal, args.calls, args.rounds))
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(20)
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
