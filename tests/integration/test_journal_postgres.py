"""The PostgreSQL journal's own behaviour, on a real server: migrations, sidecars sharing one
journal, and failing closed when the store is unreachable or slow (a proxy in front of the
server cuts, refuses or stalls its connections), then recovering by itself."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

import tether
from sidecar.config import JournalConfig
from sidecar.errors import InvalidRequestError
from sidecar.journal.base import Completion, Entry, State
from sidecar.journal.pgschema import VERSION, SchemaError
from sidecar.journal.postgres import PostgresJournal, describe
from sidecar.server import SidecarServer
from tests.e2e.tools import ToolServer
from tests.integration.conftest import SidecarFactory
from tests.integration.support import LoopThread
from tests.postgres_support import Schema, StoreProxy, fresh_schema

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
PASSWORD = "pw-never-shown"  # trust auth ignores it; errors and logs must not show it


@pytest.fixture
def schema() -> Iterator[Schema]:
    with fresh_schema() as fresh:
        yield fresh


@pytest.fixture
def proxy(schema: Schema, loop_thread: LoopThread) -> Iterator[StoreProxy]:
    """A proxy in front of the test's PostgreSQL, forwarding until told otherwise."""
    front = StoreProxy.to(schema.dsn)
    loop_thread.run(front.start())
    yield front
    loop_thread.run(front.stop())


@pytest.fixture
def tools(loop_thread: LoopThread) -> Iterator[ToolServer]:
    server = ToolServer()
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


def journal(dsn: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "postgres", "dsn": dsn, **extra}


def store(dsn: str, **extra: Any) -> PostgresJournal:
    return PostgresJournal(JournalConfig.model_validate(journal(dsn, **extra)))


def through(proxy: StoreProxy, schema: Schema) -> str:
    """The schema's DSN through the proxy, with a password in it."""
    return schema.with_host("127.0.0.1", proxy.port) + f" password={PASSWORD}"


def sample(server: SidecarServer, name: str, **labels: str) -> float | None:
    """A tether_store_* sample of the journal."""
    labels = {"store": "journal", **labels}
    return server.service.telemetry.metrics.registry.get_sample_value(name, labels)


def ready(server: SidecarServer) -> int:
    assert server.metrics_endpoint is not None
    try:
        with urllib.request.urlopen(f"{server.metrics_endpoint.url}/readyz", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as error:
        return error.code


def wait_for(condition: Any, within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


# -- migrations --------------------------------------------------------------------------


async def test_sidecars_starting_together_migrate_once(schema: Schema) -> None:
    """Five stores opening at once on an empty schema: each migration is applied once (under
    the advisory lock), recorded with its version, and every store serves."""
    stores = [store(schema.dsn, pool_min=0) for _ in range(5)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert all(s.available for s in stores)
        rows = schema.query("SELECT version, description FROM tether_schema_migrations")
        assert [version for version, _ in rows] == list(range(1, VERSION + 1))
        tables = schema.query(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() ORDER BY 1"
        )
        names = [name for (name,) in tables]
        assert names == ["tether_checkpoints", "tether_entries", "tether_runs",
                         "tether_schema_migrations"]  # fmt: skip
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_newer_schema_is_refused(schema: Schema) -> None:
    """A journal migrated by a newer sidecar is not written by an older one: open fails
    with the versions named."""
    first = store(schema.dsn)
    await first.open()
    await first.close()
    schema.query("INSERT INTO tether_schema_migrations VALUES (%s, 'from the future')",
                 (VERSION + 1,))  # fmt: skip
    with pytest.raises(SchemaError, match=f"version {VERSION + 1}; this sidecar knows up to"):
        await store(schema.dsn).open()


async def test_dsn_from_the_environment_is_named_without_its_password(
    schema: Schema, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dsn_env` names the variable holding the DSN; the store's name in messages and logs
    carries user, host, port and database, never the password."""
    monkeypatch.setenv("JOURNAL_DSN", f"{schema.dsn} password={PASSWORD}")
    config = JournalConfig.model_validate({"backend": "postgres", "dsn_env": "JOURNAL_DSN"})
    journal_store = PostgresJournal(config)
    await journal_store.open()
    try:
        assert journal_store.available and PASSWORD not in journal_store.name
        assert journal_store.name == describe(schema.dsn)  # postgresql://user@host:port/db
    finally:
        await journal_store.close()


async def test_nul_in_a_run_id_is_refused_by_name(schema: Schema) -> None:
    """PostgreSQL text cannot hold NUL: such a run id is INVALID_ARGUMENT, not a store
    failure (no incident)."""
    journal_store = store(schema.dsn)
    await journal_store.open()
    try:
        with pytest.raises(InvalidRequestError, match="run_id contains a NUL"):
            await journal_store.get("bad\x00run", "k")
        assert journal_store.available
    finally:
        await journal_store.close()


# -- sidecars sharing one journal --------------------------------------------------------


async def test_two_stores_claiming_one_key_have_one_winner(schema: Schema) -> None:
    """Two stores (two sidecars' pools) begin the same 40 keys at once, then complete the
    same 40 new keys at once: each key has one winner, and the run counts exactly 80 calls
    numbered 1..80 (a loser's number is given back)."""
    stores = [store(schema.dsn, pool_max=8) for _ in range(2)]
    await asyncio.gather(*(s.open() for s in stores))
    now = time.time()

    def entry(key: str, nth: int) -> Entry:
        return Entry("race", key, "h", "u", "op", False, State.STARTED, started_at=now + nth)

    try:
        both = [(n, i, s) for n in range(40) for i, s in enumerate(stores)]
        claims = await asyncio.gather(*(s.begin(entry(f"b{n}", i), durable=True)
                                        for n, i, s in both))  # fmt: skip
        done = Completion(State.DONE, payload=b"x")
        await asyncio.gather(*(s.complete(entry(f"c{n}", i), done) for n, i, s in both))
        summary = await stores[0].run("race")
        entries = await stores[0].entries("race")
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    winners = [claims[2 * n : 2 * n + 2].count(None) for n in range(40)]
    assert winners == [1] * 40
    assert summary is not None and summary.calls == 80
    assert sorted(e.seq for e in entries) == list(range(1, 81))


def test_a_run_replays_on_another_sidecar(make_sidecar: SidecarFactory, schema: Schema) -> None:
    """A run journaled through sidecar A replays through sidecar B (the agent moved to
    another pod): identical answers, replayed, B's upstreams never called."""
    upstreams = {"m": {"kind": "model", "type": "mock"}, "t": {"kind": "tool", "type": "mock"}}
    a = make_sidecar(upstreams, journal=journal(schema.dsn))
    b = make_sidecar(upstreams, journal=journal(schema.dsn))
    with tether.Client(a.addresses[0]) as on_a, tether.Client(b.addresses[0]) as on_b:
        run = on_a.run("moved")
        first = [(run.model("m", CHAT), run.tool("t", {"n": n})) for n in range(3)]
        run.save({"step": 3})
        again = on_b.run("moved")
        second = [(again.model("m", CHAT), again.tool("t", {"n": n})) for n in range(3)]
        saved = again.load()
        b_hits = sum(s.hits for s in on_b.status().upstreams.values())
    assert [(m.payload, t.payload) for m, t in second] == [(m.payload, t.payload)
                                                           for m, t in first]  # fmt: skip
    assert all(m.replayed and t.replayed for m, t in second) and b_hits == 0
    assert saved is not None and saved.json() == {"step": 3}


async def test_one_key_on_two_sidecars_runs_once(
    make_sidecar: SidecarFactory, schema: Schema, tools: ToolServer
) -> None:
    """Forty concurrent calls with one key to a tool, half through each of two sidecars: the
    tool runs once. The calls joined on the winner's sidecar get its answer; on the other,
    a call that finds the key running there is refused as outcome unknown (it cannot wait on
    another process), or replays once it is done."""
    tools.slow_s = 0.3
    upstreams = {"t": {"kind": "tool", "type": "http", "url": f"{tools.url}/slow"}}
    a = make_sidecar(upstreams, journal=journal(schema.dsn))
    b = make_sidecar(upstreams, journal=journal(schema.dsn))
    async with (
        tether.AsyncClient(a.addresses[0]) as on_a,
        tether.AsyncClient(b.addresses[0]) as on_b,
    ):
        calls = [c.tool("t", {"x": 1}, run_id="r", idempotency_key="same")
                 for c in (on_a, on_b) for _ in range(20)]  # fmt: skip
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    answers = {o.payload for o in outcomes if isinstance(o, tether.Result)}
    others = [o for o in outcomes if not isinstance(o, tether.Result)]
    assert tools.executions == {"same": 1}
    assert len(answers) == 1
    assert all(isinstance(o, tether.OutcomeUnknownError) for o in others), others


# -- the store unreachable or slow -------------------------------------------------------


def test_start_without_the_store_then_recover(
    make_sidecar: SidecarFactory, schema: Schema, proxy: StoreProxy
) -> None:
    """A sidecar whose PostgreSQL refuses connections starts anyway: calls without a run are
    served, journaled ones fail at once with UNAVAILABLE naming the store (no password),
    /readyz is 503; when the store answers, all of it recovers without a restart."""
    proxy.mode = "refuse"
    upstreams = {"m": {"kind": "model", "type": "mock"}}
    server = make_sidecar(upstreams, journal=journal(through(proxy, schema)),
                          listen={"metrics": "127.0.0.1:0"})  # fmt: skip
    with tether.Client(server.addresses[0], timeout_s=5) as client:
        assert client.model("m", CHAT).json()["hit"] == 1
        started = time.monotonic()
        with pytest.raises(tether.JournalUnavailableError) as info:
            client.model("m", CHAT, run_id="r", idempotency_key="k")
        assert time.monotonic() - started < 1.0
        message = info.value.message
        assert f"journal store postgresql://postgres@127.0.0.1:{proxy.port}/test" in message
        assert PASSWORD not in message and info.value.code.name == "UNAVAILABLE"
        assert ready(server) == 503 and sample(server, "tether_store_up") == 0
        proxy.mode = "forward"
        wait_for(lambda: ready(server) == 200)
        answer = client.model("m", CHAT, run_id="r", idempotency_key="k")
        assert client.model("m", CHAT, run_id="r", idempotency_key="k").replayed
    assert not answer.replayed and sample(server, "tether_store_up") == 1
    assert (sample(server, "tether_store_fallbacks_total", upstream="", policy="journal") or 0) >= 1


def _load(
    address: str, keys: list[str], acked: list[str], failures: list[BaseException], stop: Any
) -> None:
    with tether.Client(address, timeout_s=10) as client:
        for key in keys:
            if stop.is_set():
                return
            try:
                client.tool("t", {"key": key}, run_id="load", idempotency_key=key)
            except tether.TetherError as exc:
                failures.append(exc)
                continue
            acked.append(key)


def test_store_lost_mid_load_fails_closed_and_recovers(
    make_sidecar: SidecarFactory, schema: Schema, proxy: StoreProxy, tools: ToolServer,
    loop_thread: LoopThread,
) -> None:  # fmt: skip
    """Under load from 8 callers, the store's connections are cut and refused for a second:
    calls fail with UNAVAILABLE (JOURNAL_UNAVAILABLE) and nothing else, every acknowledged
    call is in the journal, calls succeed again once the store is back, and running every
    key again executes no tool twice."""
    upstreams = {"t": {"kind": "tool", "type": "http", "url": f"{tools.url}/tool"}}
    server = make_sidecar(upstreams, journal=journal(through(proxy, schema), store_timeout_s=1))
    acked: list[str] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    keys = [f"k{i}" for i in range(100_000)]
    threads = [threading.Thread(target=_load, args=(server.addresses[0], keys[i::8], acked,
                                                    failures, stop)) for i in range(8)]  # fmt: skip
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    proxy.mode = "refuse"
    loop_thread.run(proxy.cut())
    time.sleep(1.0)
    during = len(acked)
    proxy.mode = "forward"
    wait_for(lambda: len(acked) > during + 20)  # recovered by itself, under load
    stop.set()
    for thread in threads:
        thread.join(30)
    assert failures, "the outage was not noticed"
    assert all(isinstance(f, tether.JournalUnavailableError) for f in failures), failures[:3]
    states = dict(schema.query("SELECT key, state FROM tether_entries WHERE run_id = 'load'"))
    assert all(states.get(key) == "done" for key in acked)
    with tether.Client(server.addresses[0], timeout_s=10) as client:
        for key in {*acked, *(k for k in states)}:
            # (a key cut between its mark and its answer is in doubt, as it should be)
            with contextlib.suppress(tether.OutcomeUnknownError):
                client.tool("t", {"key": key}, run_id="load", idempotency_key=key)
    assert not tools.twice(), tools.twice()[:5]
    assert (sample(server, "tether_store_incidents_total") or 0) >= 1


def test_slow_store_is_bounded_by_the_store_timeout(
    make_sidecar: SidecarFactory, schema: Schema, proxy: StoreProxy, loop_thread: LoopThread
) -> None:
    """A store that accepts connections and never answers: a journaled call fails with
    UNAVAILABLE within store_timeout_s (plus scheduling), not the caller's deadline."""
    upstreams = {"m": {"kind": "model", "type": "mock"}}
    server = make_sidecar(upstreams, journal=journal(through(proxy, schema), store_timeout_s=0.5))
    with tether.Client(server.addresses[0], timeout_s=20) as client:
        client.model("m", CHAT, run_id="r", idempotency_key="before")
        proxy.mode = "stall"
        loop_thread.run(proxy.cut())
        started = time.monotonic()
        with pytest.raises(tether.JournalUnavailableError) as info:
            client.model("m", CHAT, run_id="r", idempotency_key="k")
        elapsed = time.monotonic() - started
    assert elapsed < 0.5 + 1.0, elapsed
    assert "journal store postgresql://" in info.value.message


def test_terminated_connections_are_replaced_unnoticed(
    make_sidecar: SidecarFactory, schema: Schema
) -> None:
    """The server ends every connection of the sidecar (pg_terminate_backend, as on a
    failover or restart): the next calls take fresh connections and succeed; no incident."""
    upstreams = {"m": {"kind": "model", "type": "mock"}, "t": {"kind": "tool", "type": "mock"}}
    server = make_sidecar(upstreams, journal=journal(schema.dsn, pool_min=4))
    with tether.Client(server.addresses[0]) as client:
        client.tool("t", {}, run_id="r", idempotency_key="before")
        assert schema.terminate_backends() >= 1
        answers = [client.tool("t", {"n": n}, run_id="r", idempotency_key=f"k{n}")
                   for n in range(10)]  # fmt: skip
        journaled = client.journal("r")
    assert all(not a.replayed for a in answers) and len(journaled) == 11
    assert not sample(server, "tether_store_incidents_total")
