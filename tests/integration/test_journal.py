"""Journal semantics through a real sidecar, on a real SQLite file and on a real PostgreSQL
schema (each test that starts a sidecar runs on both): streams, errors, guards."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

import tether
from sidecar.config import JournalConfig
from sidecar.errors import JournalUnavailableError
from sidecar.journal.base import Completion, Entry, State
from sidecar.journal.recorder import Recorder
from sidecar.journal.sqlite import SQLiteJournal, _Op
from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory
from tests.integration.faults import FaultServer
from tests.postgres_support import JournalBackend

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
T = TypeVar("T")


@pytest.fixture
def make_sidecar(make_sidecar: SidecarFactory, journal_backend: JournalBackend) -> SidecarFactory:
    """Sidecars whose journal is on the backend under test."""

    def make(upstreams: dict[str, Any], **extra: Any) -> SidecarServer:
        extra["journal"] = {**journal_backend.config, **extra.get("journal", {})}
        return make_sidecar(upstreams, **extra)

    return make


@contextlib.contextmanager
def store_locked(server: SidecarServer, backend: JournalBackend) -> Iterator[None]:
    """Another client holds the journal: SQLite's write lock, or PostgreSQL's tables."""
    if backend.schema is None:
        other = sqlite3.connect(server.service.config.journal.path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()
        return
    with psycopg.connect(backend.schema.dsn) as conn:
        conn.execute("LOCK TABLE tether_entries, tether_runs IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


def eventually(call: Callable[[], T], within_s: float = 5.0) -> T:
    """`call()` once the journal answers again (a store's incident ends within a probe)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return call()
        except tether.JournalUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def mock(**extra: Any) -> dict[str, Any]:
    return {"kind": "model", "type": "mock", "policies": {"retry": None}, **extra}


def test_stream_replays_its_chunks(make_sidecar: SidecarFactory) -> None:
    """A journaled stream replays the same chunks, marked replayed, without a new hit."""
    server = make_sidecar({"m": mock()})
    with tether.Client(server.addresses[0]) as client:
        first = client.stream_model("m", CHAT, run_id="s", idempotency_key="k")
        live = list(first)
        again = client.stream_model("m", CHAT, run_id="s", idempotency_key="k")
        replayed = list(again)
        hits = client.status().upstreams["m"].hits
    assert replayed == live and hits == 1
    assert again.summary.replayed and not first.summary.replayed
    assert again.summary.usage == first.summary.usage and again.summary.upstream == "m"


def test_unary_and_stream_with_one_key_disagree(make_sidecar: SidecarFactory) -> None:
    """A key journaled by a unary call cannot be replayed as a stream (another request)."""
    server = make_sidecar({"m": mock()})
    with tether.Client(server.addresses[0]) as client:
        client.model("m", CHAT, run_id="s", idempotency_key="k")
        with pytest.raises(tether.NonDeterministicReplayError):
            list(client.stream_model("m", CHAT, run_id="s", idempotency_key="k"))


def test_permanent_error_is_replayed(make_sidecar: SidecarFactory, faults: FaultServer) -> None:
    """A 400 is journaled and answered again from the journal, same status, no new hit."""
    url = faults.base_url("bad")
    faults.endpoint("bad").fail_status = 400
    server = make_sidecar({"u": {"kind": "model", "type": "openai", "base_url": url}})
    with tether.Client(server.addresses[0]) as client:
        errors = []
        for _ in range(2):
            with pytest.raises(tether.UpstreamClientError) as info:
                client.model("u", CHAT, run_id="e", idempotency_key="k")
            errors.append(info.value)
    assert faults.endpoint("bad").hits == 1
    assert errors[1].http_status == 400 and errors[1].message == errors[0].message
    assert errors[1].metadata.get("replayed") == "true"


def test_transient_error_runs_again(make_sidecar: SidecarFactory, faults: FaultServer) -> None:
    """A 503 is journaled as retryable: the replay calls the upstream again and succeeds."""
    url = faults.base_url("flaky")
    faults.endpoint("flaky").fail_next = 1
    upstream = {"kind": "model", "type": "openai", "base_url": url, "policies": {"retry": None}}
    server = make_sidecar({"u": upstream})
    with tether.Client(server.addresses[0]) as client:
        with pytest.raises(tether.UpstreamUnavailableError):
            client.model("u", CHAT, run_id="t", idempotency_key="k")
        answer = client.model("u", CHAT, run_id="t", idempotency_key="k")
        again = client.model("u", CHAT, run_id="t", idempotency_key="k")
    assert faults.endpoint("flaky").hits == 2
    assert not answer.replayed and again.replayed and again.payload == answer.payload


def test_too_large_answer_is_returned_not_kept(make_sidecar: SidecarFactory) -> None:
    """An answer over max_entry_bytes is returned, counted, and re-executed on replay
    (the model upstream is idempotent)."""
    server = make_sidecar({"m": mock()}, journal={"max_entry_bytes": 100})
    with tether.Client(server.addresses[0]) as client:
        first = client.model("m", CHAT, run_id="big", idempotency_key="k")
        second = client.model("m", CHAT, run_id="big", idempotency_key="k")
        entries = client.journal("big")
        status = client.status()
    assert len(first.payload) > 100 and not second.replayed
    assert first.json()["hit"] == 1 and second.json()["hit"] == 2
    assert entries[0].too_large
    assert status.upstreams["m"].hits == 2


def test_guarded_call_is_replayed(make_sidecar: SidecarFactory) -> None:
    """A guarded call's result is journaled; the same guard again returns it without running
    the block."""
    server = make_sidecar({"db": {"kind": "tool", "type": "guarded"}})
    ran = 0
    with tether.Client(server.addresses[0]) as client:
        for _ in range(2):
            run = client.run("g")
            with run.guard("db", {"sql": "insert"}) as call:
                if call.replayed:
                    result = call.result
                else:
                    ran += 1
                    call.set_result({"rows": 1})
                    result = {"rows": 1}
            assert result == {"rows": 1}
    assert ran == 1


def test_calls_without_run_are_not_journaled(make_sidecar: SidecarFactory) -> None:
    """Only calls with a run id and a key are journaled; others always reach the upstream."""
    server = make_sidecar({"m": mock()})
    with tether.Client(server.addresses[0]) as client:
        a = client.model("m", CHAT, idempotency_key="k")
        b = client.model("m", CHAT, idempotency_key="k")
        assert client.runs() == []
    assert (a.json()["hit"], b.json()["hit"]) == (1, 2)


# -- guarded calls: what the agent may have executed stays in doubt ----------------------


def tool_guard(**extra: Any) -> dict[str, Any]:
    return {"kind": "tool", "type": "guarded", "policies": {"retry": None}, **extra}


class _Interrupted(BaseException):
    """Stands for a cancellation of the guarded block (not an Exception)."""


def test_guard_whose_lease_ran_out_stays_in_doubt(make_sidecar: SidecarFactory) -> None:
    """A non-idempotent guarded call whose end never came (the agent may have executed it)
    is in doubt when its lease runs out, not forgotten and run again."""
    server = make_sidecar({"db": tool_guard(timeout_s=0.2)})
    with tether.Client(server.addresses[0]) as client:
        run = client.run("lease")
        state = run.guard("db", {"sql": "insert"}).__enter__()  # the agent dies in the block
        assert not state.replayed and state.call_id
        time.sleep(0.5)
        with pytest.raises(tether.OutcomeUnknownError):
            client.run("lease").guard("db", {"sql": "insert"}).__enter__()
        assert [e.in_doubt for e in client.journal("lease")] == [True]


def test_cancelled_guard_block_stays_in_doubt(make_sidecar: SidecarFactory) -> None:
    """A non-idempotent guarded block cancelled mid-way may have had its effect: in doubt."""
    server = make_sidecar({"db": tool_guard()})
    with tether.Client(server.addresses[0]) as client:
        with pytest.raises(_Interrupted), client.run("cancel").guard("db", {"n": 1}):
            raise _Interrupted
        with pytest.raises(tether.OutcomeUnknownError):
            client.run("cancel").guard("db", {"n": 1}).__enter__()


def test_guard_errors_in_doubt_retried_or_replayed(make_sidecar: SidecarFactory) -> None:
    """A guarded error: transient without a status (a reset: the request may have got
    through) is in doubt; transient with a status (answered 503) runs again; permanent is
    replayed as it is."""

    class Answered(Exception):
        status_code = 503

    server = make_sidecar({"db": tool_guard()})
    with tether.Client(server.addresses[0]) as client:
        ran = []
        for error in (ConnectionResetError("reset"), Answered("busy"), ValueError("bad")):
            name = type(error).__name__
            guard = {"run_id": "e", "idempotency_key": name}
            with pytest.raises(type(error)), client.guard("db", {}, **guard):
                raise error
            try:
                with client.guard("db", {}, **guard) as call:
                    ran.append((name, "replayed" if call.replayed else "ran", call.error))
            except tether.OutcomeUnknownError:
                ran.append((name, "in doubt", None))
    assert ran == [
        ("ConnectionResetError", "in doubt", None),
        ("Answered", "ran", None),
        ("ValueError", "replayed", "ValueError: bad"),
    ]


def test_guard_replay_keeps_the_exact_bytes(make_sidecar: SidecarFactory) -> None:
    """A replayed guard exposes the journaled bytes unchanged (`payload`), and `result`
    parsed from them."""
    server = make_sidecar({"db": tool_guard()})
    raw = b'{ "b" : 1,  "a" : [1.50] }'
    with tether.Client(server.addresses[0]) as client:
        with client.run("bytes").guard("db") as call:
            call.set_result(raw)
        with client.run("bytes").guard("db") as again:
            assert again.replayed
    assert again.payload == raw and again.result == {"b": 1, "a": [1.5]}


# -- retention -------------------------------------------------------------------------


def test_retention_keeps_calls_in_doubt(make_sidecar: SidecarFactory) -> None:
    """The per-run count rule never removes an entry in doubt (the call is not run twice)."""
    tool = {"kind": "tool", "type": "mock", "fail_first": 1, "failure_kind": "hang",
            "timeout_s": 0.2, "policies": {"retry": None}}  # fmt: skip
    retention = {"max_entries_per_run": 2, "interval_s": 0.05}
    server = make_sidecar({"t": tool}, journal={"retention": retention})
    with tether.Client(server.addresses[0]) as client:
        run = client.run("keep")
        with pytest.raises(tether.UpstreamTimeoutError):
            run.tool("t", {"n": 0})  # in doubt: the tool may have run
        for n in range(1, 5):
            run.tool("t", {"n": n})
        time.sleep(0.3)
        kept = [(e.key, e.state) for e in client.journal("keep")]
        with pytest.raises(tether.OutcomeUnknownError):
            client.tool("t", {"n": 0}, run_id="keep", idempotency_key="keep:1")
        hits = client.status().upstreams["t"].hits
    assert kept == [("keep:1", "started"), ("keep:4", "done"), ("keep:5", "done")]
    assert hits == 5


async def test_retention_pass_skips_runs_under_the_limit(short_tmp: Path) -> None:
    """A retention pass does not scan the whole journal: runs under the per-run limit cost
    nothing, and a run over it is pruned down to the limit."""
    store = SQLiteJournal(journal_config(short_tmp, max_entries_per_run=100))
    await store.open()
    try:
        await store._submit(lambda conn: _fill(conn, {f"small-{i}": 80 for i in range(50)}))
        first = await _vm_steps(store, store.expire(time.time()))
        assert first < 100, first  # in VM steps / 100: 50 runs looked up, 4,000 entries not
        now = time.time()
        await asyncio.gather(*(
            store.complete(Entry("big", f"k{n}", "h", "u", "", False, State.STARTED,
                                 started_at=now), Completion(State.DONE, payload=b"x"))
            for n in range(150)
        ))  # fmt: skip
        removed = await store.expire(time.time())
        kept = await store.entries("big")
        idle = await _vm_steps(store, store.expire(time.time()))
    finally:
        await store.close()
    assert removed.entries == 50 and [e.seq for e in kept] == list(range(51, 151))
    assert idle < 5, idle  # nothing written since the last pass: nothing looked at


def journal_config(directory: Path, **retention: Any) -> JournalConfig:
    return JournalConfig.model_validate(
        {"path": str(directory / "j.db"), "retention": {"max_age_s": 3600, **retention}}
    )


def _fill(conn: sqlite3.Connection, runs: dict[str, int]) -> None:
    now = time.time()
    for run_id, count in runs.items():
        conn.execute("INSERT INTO runs (run_id, created_at, updated_at, calls) "
                     "VALUES (?, ?, ?, ?)", (run_id, now, now, count))  # fmt: skip
        conn.executemany(
            "INSERT INTO entries (run_id, key, seq, request_hash, upstream, operation, stream, "
            "state, started_at, completed_at, payload) VALUES (?, ?, ?, 'h', 'u', '', 0, "
            "'done', ?, ?, x'00')",
            [(run_id, f"k{n}", n, now, now) for n in range(1, count + 1)],
        )


async def _vm_steps(store: SQLiteJournal, work: Awaitable[Any]) -> int:
    """SQLite VM steps (in hundreds) the writer connection spends on `work`."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    await store._submit(lambda conn: conn.set_progress_handler(count, 100))
    try:
        await work
    finally:
        await store._submit(lambda conn: conn.set_progress_handler(None, 100))
    return steps[0]


# -- streams ---------------------------------------------------------------------------


def cut_stream_model() -> dict[str, Any]:
    """A non-idempotent model whose first stream is cut mid-way (a reset)."""
    return mock(idempotent=False, fail_first=1, failure_kind="reset")


def test_stream_cut_midway_is_in_doubt(make_sidecar: SidecarFactory) -> None:
    """A stream to a non-idempotent upstream cut after it began may have had its effect:
    in doubt, not run again."""
    server = make_sidecar({"m": cut_stream_model()})
    with tether.Client(server.addresses[0]) as client:
        with pytest.raises(tether.UpstreamUnavailableError):
            list(client.stream_model("m", CHAT, run_id="cut", idempotency_key="k"))
        with pytest.raises(tether.OutcomeUnknownError):
            list(client.stream_model("m", CHAT, run_id="cut", idempotency_key="k"))
        assert client.status().upstreams["m"].hits == 1


def test_resolved_stream_replays_the_result_as_a_chunk(make_sidecar: SidecarFactory) -> None:
    """`resolve --result` on a stream in doubt: the next call streams that result."""
    server = make_sidecar({"m": cut_stream_model()})
    with tether.Client(server.addresses[0]) as client:
        with pytest.raises(tether.UpstreamUnavailableError):
            list(client.stream_model("m", CHAT, run_id="rs", idempotency_key="k"))
        client.resolve("rs", "k", result={"answer": 42})
        stream = client.stream_model("m", CHAT, run_id="rs", idempotency_key="k")
        chunks = list(stream)
    assert chunks == [{"answer": 42}] and stream.summary.replayed


def test_resolve_refuses_calls_not_in_doubt(make_sidecar: SidecarFactory) -> None:
    """Only a call in doubt can be resolved; a completed one keeps its answer."""
    server = make_sidecar({"m": mock()})
    with tether.Client(server.addresses[0]) as client:
        first = client.model("m", CHAT, run_id="done", idempotency_key="k")
        for action in ({"result": {"forged": True}}, {"retry": True}):
            with pytest.raises(tether.InvalidRequestError) as info:
                client.resolve("done", "k", **action)
            assert "not in doubt" in info.value.message
        again = client.model("m", CHAT, run_id="done", idempotency_key="k")
    assert again.replayed and again.payload == first.payload


# -- the writer thread -------------------------------------------------------------------


def test_a_locked_store_answers_every_caller(
    make_sidecar: SidecarFactory, journal_backend: JournalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another client holds the journal (SQLite's write lock past busy_timeout, or
    PostgreSQL's tables past store_timeout_s), every journal operation fails promptly with
    UNAVAILABLE (reads included), and once it is free the same keys work."""
    monkeypatch.setattr(SQLiteJournal, "busy_timeout_ms", 100)
    upstreams = {"m": mock(), "t": {"kind": "tool", "type": "mock"}}
    server = make_sidecar(upstreams, journal={"store_timeout_s": 0.3})
    with tether.Client(server.addresses[0], timeout_s=5) as client:
        first = client.model("m", CHAT, run_id="w", idempotency_key="k")
        with store_locked(server, journal_backend):
            for call in (
                lambda: client.model("m", CHAT, run_id="w", idempotency_key="k"),
                lambda: client.journal("w"),
                lambda: client.tool("t", {}, run_id="w", idempotency_key="t"),
            ):
                started = time.monotonic()
                with pytest.raises(tether.JournalUnavailableError):
                    call()
                assert time.monotonic() - started < 2
        again = eventually(lambda: client.model("m", CHAT, run_id="w", idempotency_key="k"))
        tool = client.tool("t", {}, run_id="w", idempotency_key="t")
    assert again.replayed and again.payload == first.payload and not tool.replayed


async def test_writer_survives_an_unexpected_error(short_tmp: Path) -> None:
    """An error outside SQLite (answering a closed event loop) does not stop the writer."""
    store = SQLiteJournal(journal_config(short_tmp))
    await store.open()
    try:
        gone = asyncio.new_event_loop()
        orphan = gone.create_future()
        gone.close()
        store._queue.put(_Op(lambda conn: None, True, orphan, gone))
        assert await asyncio.wait_for(store.get("r", "k"), 2) is None
    finally:
        await store.close()


def done_entry(run_id: str, key: str) -> tuple[Entry, Completion]:
    entry = Entry(run_id, key, "h", "m", "chat", False, State.STARTED, started_at=time.time())
    return entry, Completion(State.DONE, answered_by="m", upstream_status=200, attempts=1,
                             payload=b"answer")  # fmt: skip


async def test_a_new_key_written_by_another_process_is_updated_not_counted_twice(
    short_tmp: Path,
) -> None:
    """A key this sidecar never saw is inserted at once; when another process on the same
    file wrote it meanwhile, the outcome updates that entry and the run counts it once."""
    store = SQLiteJournal(journal_config(short_tmp))
    await store.open()
    try:
        await store.complete(*done_entry("r", "mine"))
        other = sqlite3.connect(store.path)
        _fill(other, {"shared": 1})  # entry ("shared", "k1"), seq 1, calls 1
        other.commit()
        other.close()
        assert not store.may_contain("shared", "k1")
        await store.complete(*done_entry("shared", "k1"))
        entry = await store.get("shared", "k1")
        summary = await store.run("shared")
        mine = await store.get("r", "mine")
    finally:
        await store.close()
    assert entry is not None and entry.payload == b"answer" and entry.answered_by == "m"
    assert entry.seq == 1 and summary is not None and summary.calls == 1
    assert mine is not None and mine.seq == 1 and mine.state is State.DONE


async def test_a_failing_operation_alone_in_its_transaction_leaves_nothing(
    short_tmp: Path,
) -> None:
    """An operation alone in its batch runs without a savepoint: when it fails after a
    write, the transaction is rolled back (nothing of it stays), it gets its error, and the
    writer goes on."""
    store = SQLiteJournal(journal_config(short_tmp))
    await store.open()

    def half_then_fail(conn: sqlite3.Connection) -> None:
        _fill(conn, {"half": 1})
        raise sqlite3.IntegrityError("after a write")

    try:
        with pytest.raises(sqlite3.IntegrityError, match="after a write"):
            await store._submit(half_then_fail)
        assert await store.get("half", "k1") is None
        assert await store.run("half") is None
        await store.complete(*done_entry("r", "k"))
        assert (await store.get("r", "k")) is not None
    finally:
        await store.close()


async def test_commits_wait_for_the_calls_in_flight_and_only_for_them(short_tmp: Path) -> None:
    """Group commit under load: while other journaled calls are in flight (`siblings`), a
    commit waits up to `commit_delay_s` for their outcomes, so one commit serves many; with
    none in flight it does not wait at all, and it never waits longer than the delay."""
    config = journal_config(short_tmp).model_copy(update={"commit_delay_s": 0.2})
    store = SQLiteJournal(config)
    await store.open()
    in_flight = [0]
    store.siblings = lambda: in_flight[0]
    try:
        started = time.monotonic()
        await store.complete(*done_entry("r", "alone"))  # nobody else in flight: no wait
        alone_s = time.monotonic() - started
        commits = store.commits
        in_flight[0] = 8

        # 8 calls in flight finishing a little apart: they share commits
        async def finish(n: int) -> None:
            await asyncio.sleep(n * 0.005)
            await store.complete(*done_entry("r", f"k{n}"))

        started = time.monotonic()
        await asyncio.gather(*(finish(n) for n in range(8)))
        grouped_s = time.monotonic() - started
        grouped = store.commits - commits
        in_flight[0] = 5  # others in flight that never finish: the delay bounds the wait
        started = time.monotonic()
        await store.complete(*done_entry("r", "bounded"))
        bounded_s = time.monotonic() - started
    finally:
        await store.close()
    assert alone_s < 0.15, alone_s
    assert grouped <= 2 and grouped_s < 1.0, (grouped, grouped_s)
    assert 0.19 <= bounded_s < 1.5, bounded_s


async def test_operations_after_close_are_refused(short_tmp: Path) -> None:
    """An operation submitted while (or after) the journal closes fails instead of waiting
    forever."""
    config = journal_config(short_tmp)
    store = SQLiteJournal(config)
    recorder = Recorder(store, config)
    await store.open()
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)
    with pytest.raises(JournalUnavailableError):
        await asyncio.wait_for(recorder._io(store.get("r", "k")), 2)
    await closing
    with pytest.raises(JournalUnavailableError):
        await recorder._io(store.get("r", "k"))


def test_call_cancelled_while_beginning_leaves_no_mark(
    make_sidecar: SidecarFactory, journal_backend: JournalBackend
) -> None:
    """A call whose deadline ends while its STARTED mark waits for the store never reached
    the upstream: the mark is removed, and the key runs later (no false 'outcome unknown')."""
    server = make_sidecar({"t": {"kind": "tool", "type": "mock"}})
    with tether.Client(server.addresses[0]) as client:
        with store_locked(server, journal_backend):
            with pytest.raises(tether.DeadlineExceededError):
                client.tool("t", {}, run_id="c", idempotency_key="k", timeout_s=0.3)
            time.sleep(0.2)
        time.sleep(0.3)
        answer = client.tool("t", {}, run_id="c", idempotency_key="k", timeout_s=5)
        hits = client.status().upstreams["t"].hits
    assert not answer.replayed and hits == 1


# -- single flight ---------------------------------------------------------------------


async def test_joined_callers_do_not_inherit_a_transient_error(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """Callers waiting on a key whose call failed transiently claim it again: one of them
    runs it, the others share that answer."""
    faults.endpoint("flaky").delay_s = 0.3
    faults.endpoint("flaky").fail_next = 1
    url = faults.base_url("flaky")
    server = make_sidecar({"u": {"kind": "model", "type": "openai", "base_url": url,
                                 "policies": {"retry": None}}})  # fmt: skip
    async with tether.AsyncClient(server.addresses[0], timeout_s=10) as client:
        outcomes = await asyncio.gather(
            *(client.model("u", CHAT, run_id="j", idempotency_key="k") for _ in range(10)),
            return_exceptions=True,
        )
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    answers = {o.payload for o in outcomes if isinstance(o, tether.Result)}
    assert len(failed) == 1 and isinstance(failed[0], tether.UpstreamUnavailableError), failed
    assert len(answers) == 1 and faults.endpoint("flaky").hits == 2


async def test_joined_callers_outlive_a_cancelled_caller(make_sidecar: SidecarFactory) -> None:
    """When the caller running a key gives up, the callers waiting on it run it again."""
    server = make_sidecar({"m": mock(latency_ms=300)})
    async with tether.AsyncClient(server.addresses[0]) as client:
        first = asyncio.ensure_future(
            client.model("m", CHAT, run_id="c", idempotency_key="k", timeout_s=0.1)
        )
        await asyncio.sleep(0.05)
        rest = [client.model("m", CHAT, run_id="c", idempotency_key="k", timeout_s=5)
                for _ in range(5)]  # fmt: skip
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        hits = (await client.status()).upstreams["m"].hits
    assert isinstance(outcomes[0], tether.DeadlineExceededError), outcomes[0]
    answers = outcomes[1:]
    assert all(isinstance(a, tether.Result) for a in answers), answers
    assert len({a.payload for a in answers if isinstance(a, tether.Result)}) == 1
    assert hits == 2


async def test_one_key_runs_an_idempotent_upstream_once(make_sidecar: SidecarFactory) -> None:
    """50 concurrent calls with one key to an idempotent model: one upstream execution."""
    server = make_sidecar({"m": mock(latency_ms=100)})
    async with tether.AsyncClient(server.addresses[0]) as client:
        results = await asyncio.gather(
            *(client.model("m", CHAT, run_id="once", idempotency_key="k") for _ in range(50))
        )
        hits = (await client.status()).upstreams["m"].hits
    assert hits == 1 and len({r.payload for r in results}) == 1
    assert sum(not r.replayed for r in results) == 1


# -- fallbacks -------------------------------------------------------------------------


def test_no_fallback_after_a_tool_call_that_may_have_run(make_sidecar: SidecarFactory) -> None:
    """A non-idempotent tool that timed out may have run: its fallback is not called. One
    that answered an error status did not: the fallback takes the call."""
    hang = {"kind": "tool", "type": "mock", "failure_rate": 1.0, "failure_kind": "hang",
            "timeout_s": 0.2, "policies": {"retry": None, "fallback": ["backup"]}}  # fmt: skip
    refuse = {**hang, "failure_kind": "status", "failure_status": 503}
    backup = {"kind": "tool", "type": "mock"}
    server = make_sidecar({"hang": hang, "refuse": refuse, "backup": backup})
    with tether.Client(server.addresses[0]) as client:
        with pytest.raises(tether.UpstreamTimeoutError):
            client.tool("hang", {})
        assert client.status().upstreams["backup"].hits == 0
        answer = client.tool("refuse", {})
        assert answer.upstream == "backup"


def test_journal_treats_a_call_as_its_least_idempotent_route(
    make_sidecar: SidecarFactory,
) -> None:
    """An idempotent upstream with a non-idempotent fallback is journaled like a
    non-idempotent one: its STARTED mark is written before the upstream is called."""
    server = make_sidecar({
        "m": mock(latency_ms=400, policies={"retry": None, "fallback": ["side"]}),
        "side": mock(idempotent=False),
    })  # fmt: skip
    with tether.Client(server.addresses[0]) as client, ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.model, "m", CHAT, run_id="least", idempotency_key="k")
        time.sleep(0.2)
        during = [(e.key, e.state, e.in_flight) for e in client.journal("least")]
        running.result()
    assert during == [("k", "started", True)]


# -- refusals and the SDK ----------------------------------------------------------------


def test_run_id_without_key_is_refused(make_sidecar: SidecarFactory) -> None:
    """A call with a run id but no key would not be journaled: it is refused, pointing to
    `client.run`, which derives keys."""
    server = make_sidecar({"m": mock(), "db": tool_guard()})
    with tether.Client(server.addresses[0]) as client:
        for call in (
            lambda: client.model("m", CHAT, run_id="r"),
            lambda: list(client.stream_model("m", CHAT, run_id="r")),
            lambda: client.guard("db", {}, run_id="r").__enter__(),
        ):
            with pytest.raises(tether.InvalidRequestError) as info:
                call()
            assert info.value.metadata["field"] == "idempotency_key"
            assert "client.run(" in info.value.message


class _YieldingId(str):
    """A run id whose formatting lets other threads run (as any Python code may)."""

    def __format__(self, spec: str) -> str:
        time.sleep(0)
        return str.__format__(self, spec)


def test_run_keys_are_unique_across_threads() -> None:
    """`Run.next_key` is safe to call from many threads: every call takes its own step and
    its own key."""
    with tether.Client("unix:/nonexistent.sock") as client, ThreadPoolExecutor(8) as pool:
        run = client.run(_YieldingId("threads"))
        chunks = list(pool.map(lambda _: [run.next_key() for _ in range(500)], range(8)))
    keys = [key for chunk in chunks for key in chunk]
    assert len(set(keys)) == len(keys) == 4000 and run.step == 4000
