"""tether_journal_in_doubt_entries: entries begun and never completed, except the calls
executing now; set when the sidecar starts and at each retention pass."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tether
from sidecar.config import JournalConfig
from sidecar.journal.base import Completion, Entry, State
from sidecar.journal.sqlite import SQLiteJournal
from sidecar.server import SidecarServer, create_server
from tests.integration.support import LoopThread, sidecar_config

GAUGE = "tether_journal_in_doubt_entries"


def entry(key: str) -> Entry:
    return Entry("run", key, "h", "t", "op", False, State.STARTED, started_at=time.time())


async def fill(path: Path, started: list[str], completed: list[str]) -> SQLiteJournal:
    store = SQLiteJournal(JournalConfig.model_validate({"path": str(path)}))
    await store.open()
    for key in started + completed:
        await store.begin(entry(key), durable=True)
    for key in completed:
        await store.complete(entry(key), Completion(State.DONE, answered_by="t"))
    return store


async def test_count_started_leaves_out_running_calls(short_tmp: Path) -> None:
    store = await fill(short_tmp / "j.db", ["a", "b", "c"], ["done"])
    try:
        assert await store.count_started() == 3
        assert await store.count_started([("run", "a")]) == 2
        # a running key that is completed, idempotent (no mark) or of another run: no change
        assert await store.count_started([("run", "done"), ("run", "x"), ("other", "b")]) == 3
    finally:
        await store.close()


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


def gauge(server: SidecarServer) -> float | None:
    return server.service.telemetry.metrics.registry.get_sample_value(GAUGE)


def wait_for(predicate: object, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_gauge_at_start_and_each_retention_pass(short_tmp: Path, loop: LoopThread) -> None:
    """Two entries left in doubt by a previous process count at start; a call cut by its
    timeout adds one at the next pass; a call executing meanwhile never counts."""
    socket = str(short_tmp / "s.sock")
    config = sidecar_config(
        socket,
        {"stuck": {"kind": "tool", "type": "mock", "failure_rate": 1.0,
                   "failure_kind": "hang", "timeout_s": 0.1},
         "slow": {"kind": "tool", "type": "mock", "latency_ms": 1500}},
        journal={"retention": {"interval_s": 0.1}},
    )  # fmt: skip
    previous = loop.run(fill(Path(f"{socket}.journal.db"), ["old1", "old2"], ["old3"]))
    loop.run(previous.close())

    async def start() -> SidecarServer:
        server, _ = await create_server(config)
        await server.start()
        return server

    server = loop.run(start())
    try:
        assert gauge(server) == 2
        with tether.Client(f"unix:{socket}") as client:
            with contextlib.suppress(tether.TetherError):
                client.tool("stuck", {"x": 1}, run_id="r", idempotency_key="stuck")
            assert wait_for(lambda: gauge(server) == 3)
            slow = threading.Thread(target=client.tool, args=("slow", {"x": 1}),
                                    kwargs={"run_id": "r", "idempotency_key": "slow"})  # fmt: skip
            slow.start()
            time.sleep(0.6)  # passes while "slow" runs, its entry begun: it is not in doubt
            assert gauge(server) == 3 and slow.is_alive()
            slow.join(10)
        time.sleep(0.3)
        assert gauge(server) == 3
    finally:
        loop.run(server.drain(0.1))


def test_a_failing_count_keeps_the_sidecar_up(short_tmp: Path, loop: LoopThread) -> None:
    socket = str(short_tmp / "s.sock")
    config = sidecar_config(socket, {"m": {"kind": "model", "type": "mock"}},
                            journal={"retention": {"interval_s": 0.05}})  # fmt: skip

    async def start() -> SidecarServer:
        server, _ = await create_server(config)
        assert server.service.recorder is not None

        async def broken(*args: object) -> int:
            raise RuntimeError("disk on fire")

        server.service.recorder.store.count_started = broken  # type: ignore[attr-defined]
        await server.start()
        await asyncio.sleep(0.2)
        return server

    server = loop.run(start())
    try:
        assert gauge(server) == 0
        with tether.Client(f"unix:{socket}") as client:
            client.model("m", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    finally:
        loop.run(server.drain(0.1))
