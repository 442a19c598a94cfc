"""The journal in PostgreSQL, shared by every sidecar that names the same database.

psycopg 3 (async) with a `psycopg_pool.AsyncConnectionPool` of `pool_min`..`pool_max`
connections in autocommit mode: each write is one statement committed on its own (durable
when it returns, with PostgreSQL's default `synchronous_commit = on`), a plan with several
writes (checkpoints, retention) one transaction. Claiming a key and writing an outcome are
one round trip each (the functions of `sidecar.journal.pgschema`); the other operations are
the plans of `sidecar.journal.sql`, shared with SQLite.

Bounded and fail closed. Every operation, from taking a connection to its last row, is
bounded by `store_timeout_s` (on the client; `statement_timeout` bounds it on the server
too). An operation that fails raises `JournalUnavailableError` (gRPC UNAVAILABLE) naming the
store (never its password): the call is refused, never run unjournaled. A connection that
broke (the server restarted, `pg_terminate_backend`) is replaced and the operation tried
again on another (every operation is safe to repeat: a repeated claim recognises its own
mark). When the store is unreachable or too slow, an *incident* opens: it is logged once,
calls fail at once (`StoreDownError`, with a retry delay) instead of each waiting out the
timeout, `available` turns false (`/readyz` answers 503), and a probe connects every
`PROBE_INTERVAL_S`; when the store answers again (migrations checked, a fresh pool ready)
the incident closes, logged once. The sidecar also starts while the store is unreachable,
in an incident. Incidents, failed and refused operations are told to `observe_store`.

Differences from SQLite: the key filter is not used (other sidecars write keys this one
never saw), so a call to an idempotent upstream reads its key before running; a key
running in another sidecar looks, from this one, like a call in doubt; text fields cannot
hold NUL characters (such a run id, key or operation is INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from sidecar import errors
from sidecar.config import JournalConfig, resolve_secret
from sidecar.journal.base import (
    Checkpoint,
    Completion,
    Entry,
    Retention,
    RunSummary,
    State,
    StoreDownError,
)
from sidecar.journal.pgschema import SchemaError, migrate
from sidecar.journal.sql import (
    ENTRY_COLUMNS,
    Dialect,
    Done,
    Queries,
    SqlPlan,
    advance,
    entry_of,
    error_json,
    reply,
)

log = logging.getLogger("tether.sidecar.journal")

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]
PROBE_INTERVAL_S = 0.5  # how often an unreachable store is tried again
POSTGRES = Dialect(
    "%s", "tether_", "SELECT pg_try_advisory_xact_lock(32383, hashtext(current_schema()))"
)
BEGIN = (
    f"SELECT {ENTRY_COLUMNS} FROM tether_journal_begin(%s::text, %s::text, %s::text, "
    "%s::text, %s::text, %s::boolean, %s::float8)"
)
COMPLETE = (
    "SELECT tether_journal_complete(%s::text, %s::text, %s::text, %s::text, %s::text, "
    "%s::boolean, %s::float8, %s::text, %s::float8, %s::text, %s::int4, %s::int4, %s::int8, "
    "%s::int8, %s::bytea, %s::boolean, %s::text)"
)


def describe(dsn: str) -> str:
    """The store's name for messages and logs: user, host, port and database, no password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql (unparsable dsn)"
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    return f"postgresql://{user}{params.get('host', 'localhost')}{port}/{params.get('dbname', '')}"


async def run_plan(conn: Conn, plan: SqlPlan[T]) -> T:
    """Drive a plan of `sidecar.journal.sql` on one connection."""
    answer: Any = None
    while not isinstance(step := advance(plan, answer), Done):
        cursor = await conn.execute(step.sql, step.args)
        rows = await cursor.fetchall() if cursor.description is not None else []
        answer = reply(step, cursor.rowcount, rows)
    value: T = step.value
    return value


@dataclass(slots=True)
class Incident:
    """The store unreachable or too slow, since `since` (monotonic)."""

    since: float
    reason: str
    refused: int = 0


class PostgresJournal:
    """The journal and checkpoints in PostgreSQL (see the module docstring)."""

    def __init__(self, config: JournalConfig) -> None:
        self.config = config
        self.dsn: str = config.dsn or resolve_secret(config.dsn_env or "", what="journal.dsn_env")
        self.name = describe(self.dsn)
        self._password = str(conninfo_to_dict(self.dsn).get("password") or "")
        self.queries = Queries(POSTGRES)
        self.commits = 0
        self.ops = 0
        self.observe_commit: Callable[[float, bool], None] | None = None
        self.observe_store: Callable[[str], None] | None = None
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._down: Incident | None = None
        self._closed = True
        self._prober: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Migrate and fill the pool; an unreachable store opens an incident instead (the
        sidecar serves, journaled calls fail closed until it answers). A schema newer than
        this sidecar knows raises SchemaError."""
        self._closed = False
        self.queries.touched.all = True
        try:
            self._pool = await self._connect()
        except SchemaError:
            raise
        except Exception as exc:
            self._incident(self._reason(exc))
        else:
            self._tell("up")

    async def close(self) -> None:
        self._closed = True
        if self._prober is not None:
            self._prober.cancel()
            self._prober = None
        for task in list(self._background):
            task.cancel()
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=1.0)

    @property
    def available(self) -> bool:
        return not self._closed and self._down is None and self._pool is not None

    def _connection_kwargs(self) -> dict[str, Any]:
        given = conninfo_to_dict(self.dsn)
        kwargs: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in given:
            kwargs["connect_timeout"] = max(2, math.ceil(self.config.store_timeout_s))
        if "application_name" not in given:
            kwargs["application_name"] = "tether-sidecar"
        return kwargs

    async def _configure(self, conn: Conn) -> None:
        """Server-side bounds for every connection: a statement, an open transaction."""
        timeout_ms = int(self.config.store_timeout_s * 1000)
        await conn.execute(
            f"SET statement_timeout = {timeout_ms}; "
            f"SET idle_in_transaction_session_timeout = {2 * timeout_ms}"
        )

    async def _connect(self) -> AsyncConnectionPool[Conn]:
        """Check the schema (migrating it) and open a pool, within the store timeout."""
        async with asyncio.timeout(self.config.store_timeout_s):
            kwargs = self._connection_kwargs()
            async with await psycopg.AsyncConnection.connect(self.dsn, **kwargs) as conn:
                await self._configure(conn)
                applied = await migrate(conn)
            if applied:
                log.info("journal store %s: applied schema migrations %s", self.name, applied)
            pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
                self.dsn, min_size=self.config.pool_min, max_size=self.config.pool_max,
                kwargs=kwargs, configure=self._configure, open=False, name="tether-journal",
                timeout=self.config.store_timeout_s,
                reconnect_timeout=max(10 * self.config.store_timeout_s, 30.0),
            )  # fmt: skip
            try:
                await pool.open(wait=True, timeout=self.config.store_timeout_s)
            except BaseException:
                await pool.close(timeout=0.1)
                raise
        return pool

    # -- incidents -----------------------------------------------------------------------

    def _reason(self, exc: BaseException) -> str:
        """What went wrong, in one line, without the password."""
        if isinstance(exc, TimeoutError):
            text = f"no answer within {self.config.store_timeout_s:g} s"
        else:
            text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return text.replace(self._password, "***") if self._password else text

    def _incident(self, reason: str) -> None:
        """The store is unreachable or too slow: log once, fail fast, probe until back."""
        if self._down is not None or self._closed:
            return
        self._down = Incident(time.monotonic(), reason)
        self._tell("down")
        log.warning("journal store %s unavailable: %s; journaled calls fail (UNAVAILABLE) "
                    "until it answers again", self.name, reason)  # fmt: skip
        pool, self._pool = self._pool, None
        if pool is not None:
            self._keep(pool.close(timeout=0.1))
        self._prober = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        while self._down is not None and not self._closed:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                pool = await self._connect()
            except Exception as exc:
                self._down.reason = self._reason(exc)
                continue
            if self._closed:
                await pool.close(timeout=0.1)
                return
            incident, self._down, self._pool = self._down, None, pool
            self._tell("up")
            log.info("journal store %s is back after %.1f s (%d journal operations refused)",
                     self.name, time.monotonic() - incident.since, incident.refused)  # fmt: skip

    def _keep(self, work: Awaitable[Any]) -> None:
        """Let `work` finish in the background (its errors are of no one's concern)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)

        def done(task: asyncio.Future[Any]) -> None:
            self._background.discard(task)
            if not task.cancelled():
                task.exception()

        task.add_done_callback(done)

    def _tell(self, event: str) -> None:
        if self.observe_store is not None:
            self.observe_store(event)

    # -- running operations --------------------------------------------------------------

    async def _execute(
        self, work: Callable[[Conn], Awaitable[T]], *, write: bool = False, retry: bool = True
    ) -> T:
        """`work` on a pooled connection, bounded by the store timeout; every failure is a
        JournalUnavailableError naming the store."""
        if self._closed:
            raise errors.JournalUnavailableError(f"the journal ({self.name}) is closed")
        down = self._down
        if down is not None or self._pool is None:
            reason = down.reason if down is not None else "not connected"
            if down is not None:
                down.refused += 1
            self._tell("refused")
            raise StoreDownError(f"journal store {self.name} unavailable: {reason}",
                                 retry_after_s=PROBE_INTERVAL_S)  # fmt: skip
        started = time.perf_counter()
        attempt = asyncio.ensure_future(self._attempts(self._pool, work, retry))
        try:
            result = await asyncio.wait_for(asyncio.shield(attempt), self.config.store_timeout_s)
        except BaseException as exc:
            if not attempt.done():
                attempt.cancel()  # psycopg cancels the query server-side, in the background
                self._keep(attempt)
            if not isinstance(exc, Exception) or isinstance(exc, errors.SidecarError):
                raise
            raise self._failure(exc) from None
        if write:
            self.commits += 1
            self.ops += 1
            if self.observe_commit is not None:
                self.observe_commit(time.perf_counter() - started, True)
        return result

    async def _attempts(
        self, pool: AsyncConnectionPool[Conn], work: Callable[[Conn], Awaitable[T]], retry: bool
    ) -> T:
        """`work` on a pooled connection; again on another while connections turn out broken
        (the server restarted, or terminated them), up to one per pool slot."""
        tries = 0
        while True:
            tries += 1
            async with pool.connection() as conn:
                try:
                    return await work(conn)
                except psycopg.OperationalError as exc:
                    # A lost connection, or a deadlock the server broke by rolling us back.
                    again = conn.broken or isinstance(exc, psycopg.errors.TransactionRollback)
                    if not (retry and again and tries <= self.config.pool_max):
                        raise
            log.debug("journal store %s: a connection was lost; trying another", self.name)

    def _failure(self, exc: Exception) -> errors.JournalUnavailableError:
        """The error a caller gets; an unreachable or slow store opens an incident."""
        reason = self._reason(exc)
        # Unreachable or too slow (no connection in time, a statement cancelled by the
        # server's timeout, no answer within ours): every call would wait for nothing.
        down = isinstance(exc, TimeoutError | psycopg.OperationalError) and not isinstance(
            exc, psycopg.errors.TransactionRollback
        )
        self._tell("error")
        if down:
            self._incident(reason)
        else:
            log.warning("journal store %s failed an operation: %s", self.name, reason)
        return errors.JournalUnavailableError(f"journal store {self.name} unavailable: {reason}")

    async def _plan(
        self, make: Callable[[], SqlPlan[T]], *, write: bool = False, atomic: bool = False
    ) -> T:
        """Run a plan of `Queries` (a fresh one per attempt), in a transaction if `atomic`."""

        async def work(conn: Conn) -> T:
            if not atomic:
                return await run_plan(conn, make())
            async with conn.transaction():
                return await run_plan(conn, make())

        return await self._execute(work, write=write)

    # -- calls ---------------------------------------------------------------------------

    def may_contain(self, run_id: str, key: str) -> bool:
        return True  # other sidecars write keys this one never saw

    async def begin(self, entry: Entry, *, durable: bool) -> Entry | None:
        e, tries = _storable(entry), 0

        async def work(conn: Conn) -> Entry | None:
            nonlocal tries
            tries += 1
            cursor = await conn.execute(BEGIN, (e.run_id, e.key, e.request_hash, e.upstream,
                                                e.operation, e.stream, e.started_at))  # fmt: skip
            row = await cursor.fetchone()
            if row is None:
                return None
            existing = entry_of(row)
            # Tried again after a lost connection: the mark found may be this call's own.
            mark = (existing.state, existing.started_at, existing.request_hash)
            own = tries > 1 and mark == (State.STARTED, e.started_at, e.request_hash)
            return None if own else existing

        result = await self._execute(work, write=True)
        self.queries.touched.entries.add(e.run_id)
        return result

    async def restart(self, entry: Entry, *, durable: bool) -> bool:
        return await self._plan(lambda: self.queries.restart(entry), write=True)

    async def complete(self, entry: Entry, completion: Completion) -> None:
        e, c, now = _storable(entry), completion, time.time()
        args = (e.run_id, e.key, e.request_hash, e.upstream, e.operation, e.stream,
                e.started_at, c.state.value, now, c.answered_by, c.upstream_status, c.attempts,
                c.input_tokens, c.output_tokens, c.payload, c.too_large,
                error_json(c.error))  # fmt: skip

        async def work(conn: Conn) -> None:
            await conn.execute(COMPLETE, args)

        await self._execute(work, write=True)
        self.queries.touched.entries.add(e.run_id)

    async def forget(self, run_id: str, key: str, *, started_at: float | None = None) -> None:
        # After the operations given up on before it (a cancelled `begin` finishing on the
        # server): the mark to forget may be theirs.
        pending = [task for task in self._background if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.config.store_timeout_s)
        await self._plan(lambda: self.queries.forget(run_id, key, started_at), write=True)

    async def delete(self, run_id: str, key: str) -> None:
        await self._plan(lambda: self.queries.delete(run_id, key), write=True)

    async def count_replay(self, run_id: str, key: str) -> None:
        async def work(conn: Conn) -> None:
            await run_plan(conn, self.queries.count_replay(run_id, key))

        await self._execute(work, write=True, retry=False)  # not repeated: counted once

    async def get(self, run_id: str, key: str) -> Entry | None:
        _check_text(run_id=run_id, idempotency_key=key)
        return await self._plan(lambda: self.queries.get(run_id, key))

    async def entries(self, run_id: str) -> list[Entry]:
        return await self._plan(lambda: self.queries.entries(run_id))

    async def count_started(self, excluding: Iterable[tuple[str, str]] = ()) -> int:
        running = list(excluding)
        return await self._plan(lambda: self.queries.count_started(running))

    # -- checkpoints and runs ------------------------------------------------------------

    async def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        _check_text(run_id=checkpoint.run_id)
        make = lambda: self.queries.save_checkpoint(checkpoint)  # noqa: E731
        await self._plan(make, write=True, atomic=True)

    async def load_checkpoint(self, run_id: str, step: int | None) -> Checkpoint | None:
        return await self._plan(lambda: self.queries.load_checkpoint(run_id, step))

    async def runs(self, limit: int, after: str) -> list[RunSummary]:
        return await self._plan(lambda: self.queries.runs(limit, after))

    async def run(self, run_id: str) -> RunSummary | None:
        return await self._plan(lambda: self.queries.run(run_id))

    # -- retention -----------------------------------------------------------------------

    async def expire(self, now: float) -> Retention:
        """One pass of `Queries.expire` in one transaction; skipped while another sidecar's
        pass holds the retention lock."""
        make = lambda: self.queries.expire(self.config.retention, now)  # noqa: E731
        removed = await self._plan(make, write=True, atomic=True)
        self.queries.touched.committed()
        return removed


def _check_text(**fields: str) -> None:
    """PostgreSQL text cannot hold NUL: such a value is refused, naming its field."""
    for field, value in fields.items():
        if "\x00" in value:
            raise errors.InvalidRequestError(
                f"{field} contains a NUL character, which the PostgreSQL journal cannot keep",
                field=field,
            )


def _storable(entry: Entry) -> Entry:
    _check_text(run_id=entry.run_id, idempotency_key=entry.key, operation=entry.operation)
    return entry
