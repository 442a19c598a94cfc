"""The journal with real sidecar processes, on real SQLite files and on a real PostgreSQL
schema (every test runs on both): replay, crashes, retention; and sidecars sharing one
PostgreSQL journal."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

import tether
from sidecar.journal.recorder import request_hash
from tests.conftest import ROOT
from tests.e2e.processes import start_sidecar, stop, write_config
from tests.e2e.tools import ToolServer
from tests.integration.support import LoopThread
from tests.postgres_support import JournalBackend

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def tools() -> Iterator[ToolServer]:
    loop = LoopThread()
    server = ToolServer()
    loop.run(server.start())
    yield server
    loop.run(server.stop())
    loop.stop()


def upstreams(tools: ToolServer) -> dict[str, Any]:
    return {
        "llm": {"kind": "model", "type": "mock"},
        "llm-backup": {"kind": "model", "type": "mock"},
        "ledger": {"kind": "tool", "type": "http", "url": f"{tools.url}/tool"},
        "slow-ledger": {"kind": "tool", "type": "http", "url": f"{tools.url}/slow"},
    }


class Sidecar:
    """A sidecar process on a fixed config and journal, restartable."""

    def __init__(
        self, directory: Path, tools: ToolServer, backend: JournalBackend, **extra: Any
    ) -> None:
        extra["journal"] = {**backend.config, **extra.get("journal", {})}
        self.config, self.address = write_config(directory, upstreams(tools), **extra)
        self.backend = backend
        self.journal = directory / "journal.db"
        self.log = directory / "sidecar.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sidecar:
        self.proc = start_sidecar(self.config, self.address, log=self.log)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert stop(self.proc) == 0

    def journaled(self, run_id: str) -> dict[str, str]:
        """The run's keys and their states, read from the store (the file checked intact)."""
        return self.backend.states(run_id, self.journal)

    def footprint(self) -> tuple[int, int]:
        """What retention bounds: the file and its WAL (SQLite), or the entries (PostgreSQL)."""
        if self.backend.schema is not None:
            return int(self.backend.schema.query("SELECT count(*) FROM tether_entries")[0][0]), 0
        wal = self.journal.with_name(self.journal.name + "-wal")
        return self.journal.stat().st_size, wal.stat().st_size if wal.exists() else 0


@pytest.fixture
def sidecar(
    short_tmp: Path, tools: ToolServer, journal_backend: JournalBackend
) -> Iterator[Sidecar]:
    process = Sidecar(short_tmp, tools, journal_backend).start()
    yield process
    process.stop()


def hits(client: tether.Client, upstream: str) -> int:
    return client.status().upstreams[upstream].hits


def test_replay_answers_from_the_journal(sidecar: Sidecar, tools: ToolServer) -> None:
    """The same run again gets identical answers, replayed, with no new upstream hit."""
    with tether.Client(sidecar.address) as client:
        first = client.run("job-1")
        answers = [(first.model("llm", CHAT), first.tool("ledger", {"n": i})) for i in range(5)]
        model_hits, executions = hits(client, "llm"), sum(tools.executions.values())
        again = client.run("job-1")
        replays = [(again.model("llm", CHAT), again.tool("ledger", {"n": i})) for i in range(5)]
        assert hits(client, "llm") == model_hits == 5
    assert sum(tools.executions.values()) == executions == 5
    for (m1, t1), (m2, t2) in zip(answers, replays, strict=True):
        assert (m2.payload, t2.payload) == (m1.payload, t1.payload)
        assert m2.replayed and t2.replayed and not m1.replayed and not t1.replayed
        assert m2.upstream == "llm" and m2.usage == m1.usage


def test_agent_killed_mid_run_resumes(sidecar: Sidecar, tools: ToolServer) -> None:
    """An agent SIGKILLed at step 11 and re-run replays steps 1-10, executes each tool side
    effect exactly once, and completes."""
    agent = [sys.executable, str(ROOT / "examples/resumable_agent.py"), "--run-id", "resume-1",
             "--steps", "20"]  # fmt: skip
    env = {**os.environ, "TETHER_ADDRESS": sidecar.address}
    crashed = subprocess.run([*agent, "--crash-at", "11"], env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert "step 10: executed" in crashed.stdout and "step 11: crashing" in crashed.stdout
    resumed = subprocess.run(agent, env=env, capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    out = resumed.stdout
    assert "resuming run resume-1: last checkpoint at step 10" in out
    assert all(f"step {n:>2}: replayed" in out for n in range(1, 11))
    assert all(f"step {n:>2}: executed" in out for n in range(11, 21))
    assert "10 steps replayed, 10 executed" in out
    assert len(tools.executions) == 20 and not tools.twice()


def _load(address: str, run_id: str, keys: list[str], acked: set[str], stop_at: float) -> None:
    with tether.Client(address, timeout_s=5) as client:
        for key in keys:
            if time.monotonic() > stop_at:
                return
            try:
                client.tool("ledger", {"key": key}, run_id=run_id, idempotency_key=key)
            except tether.TetherError:
                continue
            acked.add(key)


def _callers(address: str, run_id: str, keys: list[str], acked: set[str], seconds: float,
             kill: Callable[[], None] | None = None) -> None:  # fmt: skip
    """`keys` called by 16 callers at once for at most `seconds`; `kill` runs meanwhile."""
    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=_load, args=(address, run_id, keys[i::16], acked, stop_at))
               for i in range(16)]  # fmt: skip
    for thread in threads:
        thread.start()
    if kill is not None:
        kill()
    for thread in threads:
        thread.join(seconds + 30)


# Six restarts and ~7,000 calls: well under a minute on a quiet machine.
@pytest.mark.timeout(300)
def test_sidecar_sigkill_under_load_loses_nothing(sidecar: Sidecar, tools: ToolServer) -> None:
    """600 calls from 16 callers, sidecar SIGKILLed at a random moment, 6 times: every
    acknowledged call is journaled, the store is intact, no tool call runs twice for a key
    when the run is called again."""
    rng = random.Random(1234)

    def kill() -> None:
        time.sleep(rng.uniform(0.05, 0.6))
        sidecar.kill()

    for round_ in range(6):
        run_id, keys = f"load-{round_}", [f"k{round_}-{i}" for i in range(600)]
        acked: set[str] = set()
        _callers(sidecar.address, run_id, keys, acked, 30, kill)
        sidecar.start()
        journaled = sidecar.journaled(run_id)
        assert all(journaled.get(key) == "done" for key in acked), round_
        _callers(sidecar.address, run_id, keys, set(), 60)  # the run again
        assert not tools.twice(), (round_, tools.twice()[:5])
    assert len(tools.executions) > 600  # the load really ran


async def test_one_key_runs_once(sidecar: Sidecar, tools: ToolServer) -> None:
    """100 concurrent calls with one key: exactly one upstream execution, one answer."""
    async with tether.AsyncClient(sidecar.address) as client:
        results = await asyncio.gather(*(
            client.tool("ledger", {"x": 1}, run_id="r", idempotency_key="same")
            for _ in range(100)
        ))  # fmt: skip
    assert tools.executions == {"same": 1}
    assert len({r.payload for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1


def test_same_key_other_payload_is_refused(sidecar: Sidecar) -> None:
    """The same key with a different request is FAILED_PRECONDITION naming both hashes."""
    with tether.Client(sidecar.address) as client:
        client.model("llm", CHAT, run_id="r", idempotency_key="k")
        other = {**CHAT, "messages": [{"role": "user", "content": "changed"}]}
        with pytest.raises(tether.NonDeterministicReplayError) as info:
            client.model("llm", other, run_id="r", idempotency_key="k")
    journaled = request_hash("llm", "chat", False, orjson.dumps(CHAT))
    this_call = request_hash("llm", "chat", False, orjson.dumps(other))
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert journaled != this_call
    assert f"journaled with request {journaled}" in info.value.message
    assert f"this call is {this_call}" in info.value.message


def _runs_cli(sidecar: Sidecar, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "sidecar", "runs", "--address", sidecar.address, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_in_doubt_tool_call_is_refused_until_resolved(
    sidecar: Sidecar, tools: ToolServer, short_tmp: Path
) -> None:
    """A non-idempotent call cut by a crash is ABORTED 'outcome unknown' after restart, and
    `tether runs resolve` settles it with a result, or lets it run again."""
    with ThreadPoolExecutor(2) as pool, tether.Client(sidecar.address) as client:
        for key in ("a", "b"):
            tools.started.clear()
            pool.submit(
                client.tool, "slow-ledger", {"op": key}, run_id="doubt", idempotency_key=key
            )
            assert tools.started.wait(10)
        sidecar.kill()
    sidecar.start()
    tools.slow_s = 0
    with tether.Client(sidecar.address) as client:
        with pytest.raises(tether.OutcomeUnknownError) as info:
            client.tool("slow-ledger", {"op": "a"}, run_id="doubt", idempotency_key="a")
        assert info.value.code == grpc.StatusCode.ABORTED
        assert info.value.metadata["idempotency_key"] == "a"
        shown = _runs_cli(sidecar, "show", "doubt")
        assert shown.returncode == 0 and shown.stdout.count("in doubt") == 2
        (short_tmp / "result.json").write_text('{"settled": true}')
        assert _runs_cli(sidecar, "resolve", "doubt", "a", "--result",
                         str(short_tmp / "result.json")).returncode == 0  # fmt: skip
        settled = client.tool("slow-ledger", {"op": "a"}, run_id="doubt", idempotency_key="a")
        assert settled.replayed and settled.json() == {"settled": True}
        assert _runs_cli(sidecar, "resolve", "doubt", "b", "--retry").returncode == 0
        rerun = client.tool("slow-ledger", {"op": "b"}, run_id="doubt", idempotency_key="b")
        assert not rerun.replayed and rerun.json()["execution"] == 2
    # Both requests arrived before the crash; only "b" ran again, by the operator's choice.
    assert tools.executions == {"a": 1, "b": 2}


def test_retention_bounds_the_journal(
    short_tmp: Path, tools: ToolServer, journal_backend: JournalBackend
) -> None:
    """Old runs expire and the journal stops growing under a steady load (SQLite: the file;
    PostgreSQL: the entries)."""
    retention = {"max_age_s": 1.0, "interval_s": 0.2, "max_entries_per_run": 30}
    sidecar = Sidecar(short_tmp, tools, journal_backend, journal={"retention": retention}).start()
    payload = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}
    sizes = []
    try:
        with tether.Client(sidecar.address) as client:
            started = time.monotonic()
            n = 0
            while time.monotonic() - started < 5:
                client.model("llm", payload, run_id=f"ret-{n // 20:04d}", idempotency_key=str(n))
                n += 1
                if n % 100 == 0:
                    sizes.append(sidecar.footprint())
            runs = [r.run_id for r in client.runs()]
            for i in range(60):
                client.model("llm", payload, run_id="long", idempotency_key=f"l{i}")
            time.sleep(0.5)
            kept = client.journal("long")
    finally:
        sidecar.stop()
    assert "ret-0000" not in runs and len(runs) < n // 20
    assert len(kept) == 30 and kept[-1].key == "l59"
    if journal_backend.schema is not None:
        # The entries stay about one max_age of calls (how many depends on the pace of the
        # last second), far fewer than were made.
        rows = [count for count, _ in sizes]
        assert rows[-1] < n / 2 and rows[-1] <= 2 * statistics.median(rows), (n, rows)
        return
    # The file reuses the space retention frees: it stops growing. The WAL goes up and down
    # with each fold (a single sample of it says little), but stays bounded.
    files = [file for file, _wal in sizes]
    assert files[-1] <= files[len(files) // 2] * 1.3, sizes
    assert max(wal for _file, wal in sizes) < 16 << 20, sizes


def test_checkpoints_survive_a_restart(sidecar: Sidecar) -> None:
    """Three saved states: the latest and a given step load back after a restart."""
    with tether.Client(sidecar.address) as client:
        run = client.run("cp")
        for step in (1, 2, 3):
            run.save({"step": step, "notes": ["x"] * step}, step=step, metadata={"v": str(step)})
    sidecar.stop()
    sidecar.start()
    with tether.Client(sidecar.address) as client:
        run = client.run("cp")
        latest = run.load()
        assert latest is not None and latest.step == 3 and latest.json()["step"] == 3
        second = run.load(step=2)
        assert second is not None and second.json() == {"step": 2, "notes": ["x", "x"]}
        assert second.metadata == {"v": "2"}
        assert client.run("nobody").load() is None
        assert run.load(step=9) is None
        assert [r.latest_step for r in client.runs() if r.run_id == "cp"] == [3]
