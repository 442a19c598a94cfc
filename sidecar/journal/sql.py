"""What the SQL journal stores share: the row mapping, the statements, and the operations
built from them, written once for SQLite and PostgreSQL.

An operation is a *plan*: a generator that yields `Statement`s, is sent each one's reply
(every row, one row or None, or the count of rows changed, as `Statement.fetch` says) and
returns the operation's value. SQLite's writer thread drives plans synchronously, inside its
group-commit transaction; PostgreSQL drives them on a pooled connection, in a transaction
when a plan has more than one write. The decisions between statements (what to prune,
which rows are in doubt) live here, not in the stores.

Statements are written with `?` parameters and `{entries}`, `{checkpoints}`, `{runs}` for
the tables; a `Dialect` renders them (SQLite: as written; PostgreSQL: `%s` and tables named
`tether_entries`, ...). Only standard SQL both engines accept is used (`ON CONFLICT`,
`CASE`, `IN` lists), with booleans passed as parameters or `FALSE`.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import orjson

from sidecar.config import RetentionConfig
from sidecar.journal.base import Checkpoint, Entry, Retention, RunSummary, State, StoredError

T = TypeVar("T")
Fetch = Literal["all", "one", "count"]
IN_CHUNK = 500  # run ids per `IN (...)` list

ENTRY_COLUMNS = (
    "run_id, key, seq, request_hash, upstream, operation, stream, state, started_at, "
    "completed_at, answered_by, upstream_status, attempts, input_tokens, output_tokens, "
    "payload, too_large, error, replays"
)
CHECKPOINT_COLUMNS = "run_id, step, state, metadata, saved_at"


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a plan, rendered for its store."""

    sql: str
    args: Sequence[Any] = ()
    fetch: Fetch = "count"


SqlPlan = Generator[Statement, Any, T]


@dataclass(frozen=True, slots=True)
class Done:
    """A plan's value: it has no statement left."""

    value: Any


def advance(plan: SqlPlan[Any], reply: Any) -> Statement | Done:
    """The plan's next statement (sent the reply to the previous one), or its value."""
    try:
        return plan.send(reply)
    except StopIteration as done:
        return Done(done.value)


def reply(step: Statement, rowcount: int, rows: list[Any]) -> Any:
    """What a plan is sent for `step`, from its cursor's row count and rows."""
    if step.fetch == "count":
        return rowcount
    if step.fetch == "all":
        return rows
    return rows[0] if rows else None


@dataclass(frozen=True, slots=True)
class Dialect:
    """How one engine spells the statements."""

    param: str  # the parameter marker
    prefix: str  # before each table name
    # A statement answering one row, true when this process may run a retention pass now
    # (several sidecars share one PostgreSQL journal); None: always.
    retention_lock: str | None = None

    def render(self, sql: str) -> str:
        tables = {name: self.prefix + name for name in ("entries", "checkpoints", "runs")}
        return sql.format(**tables).replace("?", self.param)


SQLITE = Dialect("?", "")


# -- rows ----------------------------------------------------------------------------------


def error_json(error: StoredError | None) -> str | None:
    if error is None:
        return None
    return orjson.dumps(
        {
            "code": error.code,
            "reason": error.reason,
            "message": error.message,
            "metadata": error.metadata,
            "retryable": error.retryable,
        }
    ).decode()


def error_of(text: str | None) -> StoredError | None:
    if text is None:
        return None
    data = orjson.loads(text)
    return StoredError(
        data["code"], data["reason"], data["message"], data["metadata"], data["retryable"]
    )


def entry_of(row: Sequence[Any]) -> Entry:
    """An entry from a row of ENTRY_COLUMNS."""
    (run_id, key, seq, request_hash, upstream, operation, stream, state, started_at,
     completed_at, answered_by, upstream_status, attempts, input_tokens, output_tokens,
     payload, too_large, error, replays) = row  # fmt: skip
    return Entry(
        run_id, key, request_hash, upstream, operation, bool(stream), State(state), seq,
        started_at, completed_at, answered_by, upstream_status, attempts, input_tokens,
        output_tokens, None if payload is None else bytes(payload), bool(too_large),
        error_of(error), replays,
    )  # fmt: skip


def checkpoint_of(row: Sequence[Any]) -> Checkpoint:
    run_id, step, state, metadata, saved_at = row
    return Checkpoint(run_id, step, bytes(state), orjson.loads(metadata), saved_at)


# -- statements ----------------------------------------------------------------------------

GET = f"SELECT {ENTRY_COLUMNS} FROM {{entries}} WHERE run_id = ? AND key = ?"
ENTRIES = f"SELECT {ENTRY_COLUMNS} FROM {{entries}} WHERE run_id = ? ORDER BY seq"
# Only an entry not started already (or already this execution's own: a retried statement)
# becomes STARTED: of two processes restarting one key, one wins.
RESTART = (
    "UPDATE {entries} SET state = 'started', request_hash = ?, started_at = ?, "
    "completed_at = NULL, payload = NULL, error = NULL, too_large = FALSE "
    "WHERE run_id = ? AND key = ? AND (state <> 'started' OR started_at = ?)"
)
FORGET = "DELETE FROM {entries} WHERE run_id = ? AND key = ? AND state = 'started'"
DELETE = "DELETE FROM {entries} WHERE run_id = ? AND key = ?"
COUNT_REPLAY = "UPDATE {entries} SET replays = replays + 1 WHERE run_id = ? AND key = ?"
STARTED_KEYS = "SELECT run_id, key FROM {entries} WHERE state = 'started'"
SAVE_CHECKPOINT = (
    f"INSERT INTO {{checkpoints}} ({CHECKPOINT_COLUMNS}) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (run_id, step) DO UPDATE SET state = excluded.state, "
    "metadata = excluded.metadata, saved_at = excluded.saved_at"
)
CHECKPOINT_RUN = (
    "INSERT INTO {runs} (run_id, created_at, updated_at, latest_step) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (run_id) DO UPDATE SET updated_at = excluded.updated_at, latest_step = "
    "CASE WHEN excluded.latest_step > {runs}.latest_step THEN excluded.latest_step "
    "ELSE {runs}.latest_step END"
)
LOAD_CHECKPOINT = f"SELECT {CHECKPOINT_COLUMNS} FROM {{checkpoints}} WHERE run_id = ?"
SUMMARIES = (
    "SELECT r.run_id, r.created_at, r.updated_at, r.calls, r.latest_step, "
    "(SELECT COUNT(*) FROM {entries} e WHERE e.run_id = r.run_id AND e.state = 'started') "
    "FROM {runs} r "
)
EXPIRE_ENTRIES = "DELETE FROM {entries} WHERE started_at < ? AND state <> 'started'"
EXPIRE_CHECKPOINTS = "DELETE FROM {checkpoints} WHERE saved_at < ?"
EXPIRE_RUNS = (
    "DELETE FROM {runs} WHERE updated_at < ? "
    "AND NOT EXISTS (SELECT 1 FROM {entries} e WHERE e.run_id = {runs}.run_id) "
    "AND NOT EXISTS (SELECT 1 FROM {checkpoints} c WHERE c.run_id = {runs}.run_id)"
)
# Runs that may hold more entries than the limit: `runs.calls` counts every entry a run
# ever had, so a run at or under the limit is never looked at.
# `{only}`: nothing, or a condition naming the runs to look at.
ENTRIES_OVER = "SELECT run_id FROM {runs} WHERE {only}calls > ?"
CHECKPOINTS_OVER = (
    "SELECT run_id FROM {checkpoints} WHERE {only}TRUE GROUP BY run_id HAVING COUNT(*) > ?"
)
OLDEST_KEPT = "SELECT {order} FROM {table} WHERE run_id = ? ORDER BY {order} DESC LIMIT 1 OFFSET ?"
PRUNE = "DELETE FROM {table} WHERE run_id = ? AND {order} < ?{spare}"


class Touched:
    """The runs written since the last retention pass committed (every run until a first
    pass has: the runs of an earlier process are not known)."""

    def __init__(self) -> None:
        self.entries: set[str] = set()
        self.checkpoints: set[str] = set()
        self.all = True
        self.taken = False  # by the latest pass

    def take(self) -> tuple[set[str], set[str], bool]:
        """Hand the sets to a pass; until it commits (`committed`) the next pass looks at
        every run, so a failed pass loses nothing."""
        taken = (self.entries, self.checkpoints, self.all)
        self.entries, self.checkpoints, self.all, self.taken = set(), set(), True, True
        return taken

    def committed(self) -> None:
        """The latest pass committed: if it took the sets, the next looks only at new runs."""
        if self.taken:
            self.all = False


class Queries:
    """The operations both stores run, rendered for one dialect."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.touched = Touched()
        r = dialect.render
        self.get_sql, self.entries_sql, self.restart_sql = r(GET), r(ENTRIES), r(RESTART)
        self.forget_sql, self.delete_sql = r(FORGET), r(DELETE)
        self.count_replay_sql, self.started_sql = r(COUNT_REPLAY), r(STARTED_KEYS)
        self.save_sql, self.checkpoint_run_sql = r(SAVE_CHECKPOINT), r(CHECKPOINT_RUN)
        self.load_sql, self.summaries_sql = r(LOAD_CHECKPOINT), r(SUMMARIES)
        self.expire_sql = [r(s) for s in (EXPIRE_ENTRIES, EXPIRE_CHECKPOINTS, EXPIRE_RUNS)]

    # -- entries ---------------------------------------------------------------------

    def get(self, run_id: str, key: str) -> SqlPlan[Entry | None]:
        row = yield Statement(self.get_sql, (run_id, key), "one")
        return None if row is None else entry_of(row)

    def entries(self, run_id: str) -> SqlPlan[list[Entry]]:
        rows = yield Statement(self.entries_sql, (run_id,), "all")
        return [entry_of(row) for row in rows]

    def restart(self, entry: Entry) -> SqlPlan[bool]:
        e = entry
        args = (e.request_hash, e.started_at, e.run_id, e.key, e.started_at)
        changed = yield Statement(self.restart_sql, args)
        return bool(changed)

    def forget(self, run_id: str, key: str, started_at: float | None) -> SqlPlan[None]:
        if started_at is None:
            yield Statement(self.forget_sql, (run_id, key))
        else:
            yield Statement(self.forget_sql + " AND started_at = " + self.dialect.param,
                            (run_id, key, started_at))  # fmt: skip

    def delete(self, run_id: str, key: str) -> SqlPlan[None]:
        yield Statement(self.delete_sql, (run_id, key))

    def count_replay(self, run_id: str, key: str) -> SqlPlan[None]:
        yield Statement(self.count_replay_sql, (run_id, key))

    def count_started(self, running: Iterable[tuple[str, str]]) -> SqlPlan[int]:
        """Entries begun and not completed, except those of `running` (executing now)."""
        rows = yield Statement(self.started_sql, (), "all")
        return len({(run_id, key) for run_id, key in rows} - set(running))

    # -- checkpoints and runs ----------------------------------------------------------

    def save_checkpoint(self, cp: Checkpoint) -> SqlPlan[None]:
        self.touched.checkpoints.add(cp.run_id)
        metadata = orjson.dumps(cp.metadata).decode()
        yield Statement(self.save_sql, (cp.run_id, cp.step, cp.state, metadata, cp.saved_at))
        yield Statement(self.checkpoint_run_sql, (cp.run_id, cp.saved_at, cp.saved_at, cp.step))

    def load_checkpoint(self, run_id: str, step: int | None) -> SqlPlan[Checkpoint | None]:
        if step is None:
            statement = Statement(self.load_sql + " ORDER BY step DESC LIMIT 1", (run_id,), "one")
        else:
            sql = self.load_sql + " AND step = " + self.dialect.param
            statement = Statement(sql, (run_id, step), "one")
        row = yield statement
        return None if row is None else checkpoint_of(row)

    def runs(self, limit: int, after: str) -> SqlPlan[list[RunSummary]]:
        where = self.dialect.render("WHERE r.run_id > ? ORDER BY r.run_id LIMIT ?")
        rows = yield Statement(self.summaries_sql + where, (after, limit), "all")
        return [RunSummary(*row) for row in rows]

    def run(self, run_id: str) -> SqlPlan[RunSummary | None]:
        where = self.dialect.render("WHERE r.run_id = ?")
        rows = yield Statement(self.summaries_sql + where, (run_id,), "all")
        return RunSummary(*rows[0]) if rows else None

    # -- retention ---------------------------------------------------------------------

    def expire(self, rules: RetentionConfig, now: float) -> SqlPlan[Retention]:
        """One retention pass: by age, then the per-run counts (the newest
        `max_entries_per_run` entries of each run by seq, never one in doubt; its newest
        `max_checkpoints_per_run` checkpoints by step), then runs left empty.

        No table is scanned for the counts: only runs written since the last pass (every
        run on the first), and of those only the ones over a limit; each costs an index
        walk of at most the limit. The store calls `touched.committed()` once the pass's
        transaction has committed.
        """
        removed = Retention()
        self.touched.taken = False
        if self.dialect.retention_lock is not None:
            row = yield Statement(self.dialect.retention_lock, (), "one")
            if not row[0]:
                return removed  # another sidecar's pass is running; ours comes next time
        cutoff = now - rules.max_age_s
        entries, checkpoints, everything = self.touched.take()
        expire_entries, expire_checkpoints, expire_runs = self.expire_sql
        removed.entries = yield Statement(expire_entries, (cutoff,))
        removed.checkpoints = yield Statement(expire_checkpoints, (cutoff,))
        limit = rules.max_entries_per_run
        for run_id in (yield from self._over(ENTRIES_OVER, entries, everything, limit)):
            removed.entries += yield from self._prune(
                "entries", "seq", run_id, limit, " AND state <> 'started'"
            )
        limit = rules.max_checkpoints_per_run
        for run_id in (yield from self._over(CHECKPOINTS_OVER, checkpoints, everything, limit)):
            removed.checkpoints += yield from self._prune("checkpoints", "step", run_id, limit)
        removed.runs = yield Statement(expire_runs, (cutoff,))
        return removed

    def _over(self, sql: str, runs: set[str], everything: bool, limit: int) -> SqlPlan[list[str]]:
        """Of `runs` (or of every run), those over `limit`."""
        names = sorted(runs)
        chunks = (
            [[]]
            if everything
            else [names[i : i + IN_CHUNK] for i in range(0, len(names), IN_CHUNK)]
        )
        found: list[str] = []
        for chunk in chunks:
            only = f"run_id IN ({', '.join('?' * len(chunk))}) AND " if chunk else ""
            query = self.dialect.render(sql.replace("{only}", only))
            rows = yield Statement(query, (*chunk, limit), "all")
            found += [run_id for (run_id,) in rows]
        return found

    def _prune(
        self, table: str, order: str, run_id: str, keep: int, spare: str = ""
    ) -> SqlPlan[int]:
        """Delete the rows of `run_id` in `table` older (by `order`) than its newest `keep`,
        except those `spare` (an SQL condition) protects."""
        names = {"table": "{" + table + "}", "order": order, "spare": spare}
        oldest = self.dialect.render(OLDEST_KEPT.format(**names))
        row = yield Statement(oldest, (run_id, keep - 1), "one")
        if row is None:
            return 0
        deleted: int = yield Statement(self.dialect.render(PRUNE.format(**names)), (run_id, row[0]))
        return deleted
