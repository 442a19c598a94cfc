"""The journal on an embedded SQLite file: WAL mode, group commit on one writer thread.

Every operation runs on a single writer thread with its own connection. The thread takes all
the operations queued since its last commit, applies them in one `BEGIN IMMEDIATE`
transaction and commits once, so many calls finishing together share one fsync (with
`synchronous = FULL`, the default, a commit survives power loss; with `NORMAL` it survives a
crash of the process but not of the machine). An operation marked not durable is answered
as soon as it is applied, before its commit. The event loop never blocks on SQLite.

Every operation is answered exactly once, whatever happens: if the transaction cannot begin
(another process holds the write lock past `busy_timeout_ms`) or commit, or anything else
fails, every operation of the batch not answered yet gets the error; an unexpected error is
logged and the writer keeps serving; an operation submitted once the journal is closing or
closed raises `JournalClosedError` at once.

The statements and the retention rules are shared with PostgreSQL (`sidecar.journal.sql`);
only claiming a key and writing an outcome are SQLite's own (one writer: a read decides).

Schema (version 1):

    entries(run_id, key, seq, request_hash, upstream, operation, stream, state, started_at,
            completed_at, answered_by, upstream_status, attempts, input_tokens, output_tokens,
            payload, too_large, error (JSON), replays)   PRIMARY KEY (run_id, key)
    checkpoints(run_id, step, state, metadata (JSON), saved_at)  PRIMARY KEY (run_id, step)
    runs(run_id, created_at, updated_at, calls, latest_step)     PRIMARY KEY (run_id)
    meta(key, value): schema_version
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sidecar.config import JournalConfig
from sidecar.journal.base import (
    Checkpoint,
    Completion,
    Entry,
    JournalClosedError,
    Retention,
    RunSummary,
)
from sidecar.journal.keyfilter import KeyFilter
from sidecar.journal.sql import (
    SQLITE,
    Done,
    Queries,
    SqlPlan,
    Statement,
    advance,
    error_json,
    reply,
)

log = logging.getLogger("tether.sidecar.journal")

SCHEMA_VERSION = 1
MAX_BATCH = 512
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    run_id TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL,
    request_hash TEXT NOT NULL, upstream TEXT NOT NULL, operation TEXT NOT NULL,
    stream INTEGER NOT NULL, state TEXT NOT NULL, started_at REAL NOT NULL,
    completed_at REAL, answered_by TEXT NOT NULL DEFAULT '',
    upstream_status INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    payload BLOB, too_large INTEGER NOT NULL DEFAULT 0, error TEXT,
    replays INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS entries_by_age ON entries (started_at);
CREATE INDEX IF NOT EXISTS entries_by_seq ON entries (run_id, seq);
CREATE INDEX IF NOT EXISTS entries_started ON entries (run_id) WHERE state = 'started';
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT NOT NULL, step INTEGER NOT NULL, state BLOB NOT NULL,
    metadata TEXT NOT NULL, saved_at REAL NOT NULL,
    PRIMARY KEY (run_id, step)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS checkpoints_by_age ON checkpoints (saved_at);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    calls INTEGER NOT NULL DEFAULT 0, latest_step INTEGER NOT NULL DEFAULT -1
) WITHOUT ROWID;
"""
NEXT_SEQ = (
    "INSERT INTO runs (run_id, created_at, updated_at, calls) VALUES (?, ?, ?, 1) "
    "ON CONFLICT (run_id) DO UPDATE SET calls = runs.calls + 1, "
    "updated_at = excluded.updated_at RETURNING calls"
)
INSERT_STARTED = (
    "INSERT INTO entries (run_id, key, seq, request_hash, upstream, operation, stream, state, "
    "started_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'started', ?)"
)
COMPLETE = (
    "UPDATE entries SET state = ?, completed_at = ?, answered_by = ?, upstream_status = ?, "
    "attempts = ?, input_tokens = ?, output_tokens = ?, payload = ?, too_large = ?, error = ?, "
    "started_at = ? WHERE run_id = ? AND key = ?"
)
INSERT_DONE = (
    "INSERT INTO entries (run_id, key, seq, request_hash, upstream, operation, stream, state, "
    "started_at, completed_at, answered_by, upstream_status, attempts, input_tokens, "
    "output_tokens, payload, too_large, error) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
INSERT_NEW = INSERT_DONE + " ON CONFLICT (run_id, key) DO NOTHING"


def run_plan(conn: sqlite3.Connection, plan: SqlPlan[T]) -> T:
    """Drive a plan of `sidecar.journal.sql` on the writer's connection."""
    answer: Any = None
    while not isinstance(step := advance(plan, answer), Done):
        cursor = conn.execute(step.sql, step.args)
        answer = reply(step, cursor.rowcount, cursor.fetchall())
    value: T = step.value
    return value


class _Op:
    """One queued operation: `apply` runs on the writer thread inside a transaction."""

    __slots__ = ("answered", "apply", "durable", "future", "loop", "standalone")

    def __init__(
        self,
        apply: Callable[[sqlite3.Connection], Any],
        durable: bool,
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
        standalone: bool = False,
    ) -> None:
        self.apply = apply
        self.durable = durable
        self.future = future
        self.loop = loop
        self.standalone = standalone  # runs alone, outside a transaction (maintenance)
        self.answered = False  # set on the writer thread once its answer is on its way


OpResult = tuple[_Op, Any, BaseException | None]


def _settle(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """Runs on the event loop: answer a batch of operations."""
    for future, value, error in results:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def _answer(outcomes: list[OpResult]) -> None:
    """Send each operation its answer, once, on its own event loop (from the writer thread).
    An operation whose loop has closed has nobody left to answer."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
    for op, value, error in outcomes:
        if op.answered:
            continue
        op.answered = True
        by_loop.setdefault(op.loop, []).append((op.future, value, error))
    for loop, results in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, results)
        except RuntimeError:  # the loop is closed
            log.debug("journal: %d answers for a closed event loop dropped", len(results))


class SQLiteJournal:
    """The journal and checkpoints in one SQLite file (see the module docstring)."""

    # How long the writer waits for a write lock another connection holds, before the
    # batch fails (every operation in it is answered with the error).
    busy_timeout_ms = 5000

    def __init__(self, config: JournalConfig) -> None:
        self.config = config
        self.path = config.path
        self.commits = 0
        self.ops = 0
        self.observe_commit: Callable[[float, bool], None] | None = None
        self.observe_store: Callable[[str], None] | None = None
        # How many journaled calls are in flight (set by the Recorder; read by the writer).
        self.siblings: Callable[[], int] | None = None
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        # Guards `_closed` and the queue's end: nothing is queued after the writer's stop.
        self._lock = threading.Lock()
        self._closed = False
        # Statements and retention's record of the runs written (writer thread only).
        self.queries = Queries(SQLITE)
        self.keys = KeyFilter()

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Create or open the file, apply the schema, start the writer thread."""
        self._closed = False
        self.queries.touched.all = True
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="tether-journal", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._ready.wait)
        if self._open_error is not None:
            raise self._open_error
        if self.observe_store is not None:
            self.observe_store("up")

    async def close(self) -> None:
        """Stop the writer after the operations already queued; later ones are refused."""
        if self._thread is None:
            return
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def _connect(self) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.config.synchronous.upper()}")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
        conn.execute("PRAGMA journal_size_limit=16777216")  # the WAL shrinks back to 16 MiB
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.executescript(SCHEMA)
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
            (str(SCHEMA_VERSION),),
        )
        for run_id, key in conn.execute("SELECT run_id, key FROM entries"):
            self.keys.add(run_id, key)
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if int(version[0]) != SCHEMA_VERSION:
            raise RuntimeError(
                f"journal {self.path} has schema version {version[0]}; this sidecar knows "
                f"version {SCHEMA_VERSION}"
            )
        return conn

    def _run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # reported to open()
            self._open_error = exc
            self._closed = True
            self._ready.set()
            return
        self._ready.set()
        try:
            more = True
            while more:
                ops, more = self._take_batch()
                try:
                    self._serve_batch(conn, ops)
                except Exception as exc:  # a bug or an environment failure: keep serving
                    log.exception("journal writer: unexpected error; its batch failed")
                    _answer([(op, None, exc) for op in ops])
        finally:
            self._stop(conn)

    def _stop(self, conn: sqlite3.Connection) -> None:
        """The writer is leaving: refuse what comes next, answer what is still queued."""
        with self._lock:
            self._closed = True
        left: list[OpResult] = []
        while True:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                break
            if op is not None:
                left.append((op, None, JournalClosedError("the journal is closed")))
        _answer(left)
        conn.close()

    # -- the writer thread -------------------------------------------------------------

    def _take_batch(self) -> tuple[list[_Op], bool]:
        """The operations queued now; more (up to `commit_delay_s`) while other journaled
        calls are in flight that have not queued theirs yet (group commit under load: one
        commit then serves them all, where they would each pay one)."""
        first = self._queue.get()
        if first is None:
            return [], False
        ops = [first]
        more = self._drain(ops)
        delay = self.config.commit_delay_s
        siblings = self.siblings
        if not more or delay <= 0 or siblings is None or siblings() <= len(ops):
            return ops, more
        deadline = time.monotonic() + delay
        while len(ops) < MAX_BATCH and siblings() > len(ops):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                op = self._queue.get(timeout=left)
            except queue.Empty:
                break
            if op is None:
                return ops, False
            ops.append(op)
            if not self._drain(ops):
                return ops, False
        return ops, True

    def _drain(self, ops: list[_Op]) -> bool:
        """Add what is queued now to `ops` (up to MAX_BATCH); False once the end is met."""
        while len(ops) < MAX_BATCH:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return True
            if op is None:
                return False
            ops.append(op)
        return True

    def _serve_batch(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        batch = [op for op in ops if not op.standalone]
        if batch:
            self._apply_batch(conn, batch)
        for op in ops:
            if op.standalone:
                self._apply_standalone(conn, op)

    def _apply_standalone(self, conn: sqlite3.Connection, op: _Op) -> None:
        try:
            outcome: OpResult = (op, op.apply(conn), None)
        except Exception as exc:
            outcome = (op, None, exc)
        _answer([outcome])

    def _apply_batch(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        """Apply `ops` in one transaction and commit once. Operations not durable are
        answered as soon as they are applied; the others after the commit. If anything
        fails (the lock, the commit, anything else) every operation not answered yet gets
        the error: none is left waiting. An operation that fails is undone alone (a
        savepoint each) when others share its transaction; alone, its transaction is."""
        results: list[OpResult] = []
        alone = len(ops) == 1
        try:
            conn.execute("BEGIN IMMEDIATE")
            early: list[OpResult] = []
            for op in ops:
                outcome = self._apply_alone(conn, op) if alone else self._apply_one(conn, op)
                if alone and outcome[2] is not None:
                    conn.execute("ROLLBACK")
                    _answer([outcome])
                    return
                (results if op.durable else early).append(outcome)
            _answer(early)
            committing = time.perf_counter()
            conn.execute("COMMIT")
            self.commits += 1
            self.ops += len(ops)
            if self.observe_commit is not None:
                self.observe_commit(time.perf_counter() - committing, bool(results))
        except Exception as exc:
            log.error("journal commit failed: %s", exc)
            if self.observe_store is not None:
                self.observe_store("error")
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback:
                    log.error("journal rollback failed: %s", rollback)
            results = [(op, None, exc) for op in ops]
        _answer(results)

    @staticmethod
    def _apply_one(conn: sqlite3.Connection, op: _Op) -> OpResult:
        conn.execute("SAVEPOINT op")
        try:
            value = op.apply(conn)
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            return op, None, exc
        conn.execute("RELEASE op")
        return op, value, None

    @staticmethod
    def _apply_alone(conn: sqlite3.Connection, op: _Op) -> OpResult:
        """The only operation of its transaction: no savepoint (the caller rolls the
        transaction back if it fails)."""
        try:
            return op, op.apply(conn), None
        except Exception as exc:
            return op, None, exc

    def _submit(
        self,
        apply: Callable[[sqlite3.Connection], T],
        *,
        durable: bool = True,
        standalone: bool = False,
    ) -> Any:
        """Queue `apply` for the writer; the returned future gets its answer, exactly once.
        JournalClosedError when the journal is not open (closed, closing, or its writer
        stopped)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            thread = self._thread
            if self._closed or thread is None or not thread.is_alive():
                raise JournalClosedError("the journal is closed")
            self._queue.put(_Op(apply, durable, future, loop, standalone))
        return future

    def _submit_plan(self, plan: SqlPlan[T], *, durable: bool = True) -> Any:
        """Queue a plan of `sidecar.journal.sql` for the writer (see `_submit`)."""
        return self._submit(lambda conn: run_plan(conn, plan), durable=durable)

    @property
    def available(self) -> bool:
        thread = self._thread
        return not self._closed and thread is not None and thread.is_alive()

    # -- calls -------------------------------------------------------------------------

    def may_contain(self, run_id: str, key: str) -> bool:
        return self.keys.may_contain(run_id, key)

    async def begin(self, entry: Entry, *, durable: bool) -> Entry | None:
        self.keys.add(entry.run_id, entry.key)
        result: Entry | None = await self._submit_plan(self._begin(entry), durable=durable)
        return result

    def _begin(self, entry: Entry) -> SqlPlan[Entry | None]:
        """One writer: a read decides whether the key is new."""
        existing = yield from self.queries.get(entry.run_id, entry.key)
        if existing is not None:
            return existing
        e = entry
        e.seq = yield from self._next_seq(e.run_id, e.started_at)
        yield Statement(INSERT_STARTED, (e.run_id, e.key, e.seq, e.request_hash, e.upstream,
                                         e.operation, e.stream, e.started_at))  # fmt: skip
        return None

    def _next_seq(self, run_id: str, now: float) -> SqlPlan[int]:
        self.queries.touched.entries.add(run_id)
        row = yield Statement(NEXT_SEQ, (run_id, now, now), "one")
        return int(row[0])

    async def restart(self, entry: Entry, *, durable: bool) -> bool:
        won: bool = await self._submit_plan(self.queries.restart(entry), durable=durable)
        return won

    async def complete(self, entry: Entry, completion: Completion) -> None:
        """Write the outcome into the entry, inserting it if it was never begun here."""
        new = not self.keys.may_contain(entry.run_id, entry.key)
        self.keys.add(entry.run_id, entry.key)
        await self._submit_plan(self._complete(entry, completion, time.time(), new))

    def _complete(self, e: Entry, c: Completion, now: float, new: bool) -> SqlPlan[None]:
        """`new`: the key filter says no entry has this key (an idempotent call, never
        begun): insert it at once, two statements; else update the entry begun, or insert
        it. An entry of the key written meanwhile by another process on this file makes
        the insert a no-op: the update path then runs, and the call is not counted twice."""
        values = (c.state.value, now, c.answered_by, c.upstream_status, c.attempts,
                  c.input_tokens, c.output_tokens, c.payload, c.too_large,
                  error_json(c.error))  # fmt: skip
        self.queries.touched.entries.add(e.run_id)  # an entry no longer in doubt may go
        if new:
            seq = yield from self._next_seq(e.run_id, now)  # also the run's updated_at
            inserted = yield Statement(INSERT_NEW, (e.run_id, e.key, seq, e.request_hash,
                                                    e.upstream, e.operation, e.stream,
                                                    c.state.value, e.started_at, now,
                                                    *values[2:]))  # fmt: skip
            if inserted:
                return
            yield Statement("UPDATE runs SET calls = calls - 1 WHERE run_id = ?", (e.run_id,))
        updated = yield Statement(COMPLETE, (*values, e.started_at, e.run_id, e.key))
        if not updated:
            seq = yield from self._next_seq(e.run_id, now)
            yield Statement(INSERT_DONE, (e.run_id, e.key, seq, e.request_hash, e.upstream,
                                          e.operation, e.stream, c.state.value, e.started_at,
                                          now, *values[2:]))  # fmt: skip
        yield Statement("UPDATE runs SET updated_at = ? WHERE run_id = ?", (now, e.run_id))

    async def forget(self, run_id: str, key: str, *, started_at: float | None = None) -> None:
        await self._submit_plan(self.queries.forget(run_id, key, started_at), durable=False)

    async def delete(self, run_id: str, key: str) -> None:
        await self._submit_plan(self.queries.delete(run_id, key))

    async def count_replay(self, run_id: str, key: str) -> None:
        await self._submit_plan(self.queries.count_replay(run_id, key), durable=False)

    async def get(self, run_id: str, key: str) -> Entry | None:
        result: Entry | None = await self._submit_plan(self.queries.get(run_id, key), durable=False)
        return result

    async def entries(self, run_id: str) -> list[Entry]:
        result: list[Entry] = await self._submit_plan(self.queries.entries(run_id), durable=False)
        return result

    async def count_started(self, excluding: Iterable[tuple[str, str]] = ()) -> int:
        """Entries begun and not completed (STARTED), except those of the `(run_id, key)`
        pairs in `excluding` (the calls executing now): the entries in doubt."""
        plan = self.queries.count_started(list(excluding))
        result: int = await self._submit_plan(plan, durable=False)
        return result

    # -- checkpoints and runs ------------------------------------------------------------

    async def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        await self._submit_plan(self.queries.save_checkpoint(checkpoint))

    async def load_checkpoint(self, run_id: str, step: int | None) -> Checkpoint | None:
        plan = self.queries.load_checkpoint(run_id, step)
        result: Checkpoint | None = await self._submit_plan(plan, durable=False)
        return result

    async def runs(self, limit: int, after: str) -> list[RunSummary]:
        plan = self.queries.runs(limit, after)
        result: list[RunSummary] = await self._submit_plan(plan, durable=False)
        return result

    async def run(self, run_id: str) -> RunSummary | None:
        result: RunSummary | None = await self._submit_plan(self.queries.run(run_id), durable=False)
        return result

    # -- retention -----------------------------------------------------------------------

    async def expire(self, now: float) -> Retention:
        """One pass of `Queries.expire`, then the WAL folded back into the file."""
        plan = self.queries.expire(self.config.retention, now)
        result: Retention = await self._submit_plan(plan)
        self.queries.touched.committed()
        await self._submit(self._fold_wal, standalone=True)
        return result

    @staticmethod
    def _fold_wal(conn: sqlite3.Connection) -> None:
        """Fold the WAL back into the file and truncate it (outside any transaction)."""
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
