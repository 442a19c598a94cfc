"""Profile a proxy under load with py-spy and summarize where its CPU time goes.

`py-spy record --format raw` writes one collapsed stack per line (`root;...;leaf count`,
each frame `function (file:line)`); idle threads are left out. The summary gives the share
of samples per thread *role* (event loop, journal writer, span exporter), per *area* (the
library or sidecar module of the leaf frame: self time), and the functions with the most
self time and the most inclusive time. py-spy sees Python frames only: time in C code
(uvloop, gRPC's core, protobuf, syscalls) counts for the innermost Python frame, so samples
whose leaf is the loop's `run` are the event loop's own native work.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.load import Call, run_load
from bench.procs import LOAD_CPU, pinned

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
NATIVE_LOOP = "event loop in native code (uvloop, grpc core, syscalls)"
ENTRY_FILES = ("sidecar/cli.py", "sidecar/__main__.py", "sidecar/server.py")
ROLES = (  # threads other than the main one: (a function in the stack, the thread's role)
    ("SQLiteJournal._run", "journal writer thread"),
    ("BatchProcessor.worker", "span export thread"),
    ("BatchSpanProcessor.worker", "span export thread"),
)
AREAS = (  # first match wins: (substring of the file path, area)
    ("/sidecar/journal/", "sidecar journal"),
    ("/sidecar/telemetry/", "sidecar telemetry"),
    ("/sidecar/upstreams/", "sidecar upstream adapter"),
    ("/sidecar/policies/", "sidecar policies"),
    ("/sidecar/http/", "sidecar HTTP front"),
    ("/sidecar/", "sidecar core (service, pipeline)"),
    ("/tether/", "tether SDK messages"),
    ("/opentelemetry/", "opentelemetry SDK"),
    ("/prometheus_client/", "prometheus_client"),
    ("/grpc/", "grpc (python layer)"),
    ("/aiohttp/", "aiohttp"),
    ("/multidict/", "aiohttp"),
    ("/yarl/", "aiohttp"),
    ("/google/protobuf/", "protobuf"),
    ("/pybreaker", "pybreaker"),
    ("sqlite3", "sqlite3"),
    ("/asyncio/", "asyncio"),
    ("/logging/", "logging"),
    ("/threading.py", "threads (waiting, locks)"),
    ("/queue.py", "threads (waiting, locks)"),
)


def py_spy() -> str | None:
    """The py-spy command next to this Python, else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def area(file: str) -> str:
    for fragment, name in AREAS:
        if fragment in file:
            return name
    return "other"


def parse(raw: str) -> list[tuple[list[tuple[str, str]], int]]:
    """Collapsed stacks: [(frames root..leaf as (function, file)), samples]."""
    stacks = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = []
        for text in stack.split(";"):
            match = FRAME.match(text.strip())
            frames.append((match["function"], match["file"]) if match else (text.strip(), ""))
        stacks.append((frames, int(count)))
    return stacks


def role(frames: list[tuple[str, str]]) -> str:
    """The main thread runs the event loop (its task frames start at a coroutine, not at
    `Runner.run`); other threads start at `Thread._bootstrap`."""
    if frames[0][0] != "Thread._bootstrap":
        return "event loop thread"
    functions = {function for function, _ in frames}
    return next((name for marker, name in ROLES if marker in functions), "other threads")


def summarize(raw: str, top: int = 12) -> dict[str, Any]:
    """Shares of samples (%) per thread role, per area and function of the leaf frame
    (self time), and per sidecar function anywhere in the stack (inclusive time)."""
    stacks = parse(raw)
    total = sum(count for _, count in stacks) or 1
    roles: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        function, file = frames[-1]
        native = function in ("Runner.run", "run_until_complete", "run_forever")
        roles[role(frames)] += count
        areas[NATIVE_LOOP if native else area(file)] += count
        leaves[f"{function} ({_short(file)})"] += count
        for seen in {f"{f} ({_short(p)})" for f, p in frames
                     if "/sidecar/" in p and not p.endswith(ENTRY_FILES)}:  # fmt: skip
            inclusive[seen] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "by_role": share(roles),
        "self_by_area": share(areas),
        "self_by_function": share(leaves),
        "inclusive_sidecar": share(inclusive),
    }


def _short(path: str) -> str:
    """A path from its package on (`sidecar/service.py`, `aiohttp/client.py`)."""
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1]
    for package in ("/sidecar/", "/tether/", "/bench/"):
        if package in path:
            return package[1:] + path.rsplit(package, 1)[1]
    return path.rsplit("/python3.11/", 1)[-1]


async def record(pid: int, call: Call, *, seconds: float, out: Path) -> dict[str, Any] | None:
    """py-spy `pid` for `seconds` while `call` runs at c=32; the summary, or None without
    py-spy."""
    command = py_spy()
    if command is None:
        print("py-spy not found: no profile (pip install -e '.[bench]')", flush=True)
        return None
    argv = pinned(
        LOAD_CPU,
        [
            command,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(math.ceil(seconds)),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
            "--full-filenames",
        ],
    )
    spy = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    await asyncio.sleep(0.5)  # py-spy attaches
    load = await run_load(call, calls=10**7, concurrency=32, max_s=seconds + 1)
    _, err = await spy.communicate()
    raw = await asyncio.to_thread(lambda: out.read_text() if out.exists() else "")
    if spy.returncode != 0 or not raw:
        print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", flush=True)
        return None
    found = summarize(raw)
    found["calls_per_s"] = load.ok / load.wall_s if load.wall_s else 0.0
    found["seconds"] = seconds
    return found
