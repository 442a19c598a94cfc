"""The PostgreSQL journal's schema: numbered migrations, applied at start-up.

`migrate` runs in one transaction under an advisory lock (one per schema), so several
sidecars starting together apply each migration once: the first takes the lock and applies
what is missing; the others wait, then find nothing to do. `tether_schema_migrations` keeps
one row per applied migration. A database whose schema is newer than this sidecar knows is
refused (`SchemaError`) rather than written with the wrong shape.

Migrations are append-only: a released one is never edited; a change is a new number.
The tables mirror the SQLite journal's (`sidecar.journal.sqlite`), named `tether_*`, and
claiming a key and writing an outcome are functions, so each is one round trip:

- `tether_journal_begin(...)` returns the key's entry if it has one; else it inserts the
  STARTED mark, numbered with the run's next seq, by `INSERT ... ON CONFLICT DO NOTHING`:
  of concurrent callers (several sidecars) one inserts, the others wait for it to commit
  and get its entry. It returns no row when this call inserted the mark.
- `tether_journal_complete(...)` writes an outcome into the entry, inserting it (with the
  next seq) if it was never begun.

A writer that loses the race gives its seq back (its sub-block is rolled back), so
`tether_runs.calls` counts exactly the entries a run ever had. Each function's plans are
kept per connection (plpgsql); the row is written once, with its seq.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from sidecar.config import ConfigError

MIGRATIONS_TABLE = "tether_schema_migrations"
LOCK_CLASS = 0x7E7E  # pg_advisory_xact_lock(class, hashtext(current_schema())) of migrations


class SchemaError(ConfigError):
    """The database holds a journal schema this sidecar cannot use (`tether serve` exits
    with it, as with a configuration it cannot use)."""

    def __init__(self, message: str) -> None:
        super().__init__("journal", [message])


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    sql: str


V1 = r"""
CREATE TABLE tether_runs (
    run_id      text COLLATE "C" PRIMARY KEY,
    created_at  double precision NOT NULL,           -- seconds since the epoch
    updated_at  double precision NOT NULL,
    calls       bigint NOT NULL DEFAULT 0,           -- entries the run ever had (the last seq)
    latest_step bigint NOT NULL DEFAULT -1           -- its highest checkpoint step
);

CREATE TABLE tether_entries (
    run_id          text COLLATE "C" NOT NULL,
    key             text COLLATE "C" NOT NULL,       -- the idempotency key
    seq             bigint NOT NULL,                 -- order within the run, from 1
    request_hash    text NOT NULL,                   -- upstream, operation, stream, payload
    upstream        text NOT NULL,
    operation       text NOT NULL,
    stream          boolean NOT NULL,
    state           text NOT NULL CHECK (state IN ('started', 'done', 'failed')),
    started_at      double precision NOT NULL,
    completed_at    double precision,
    answered_by     text NOT NULL DEFAULT '',
    upstream_status integer NOT NULL DEFAULT 0,
    attempts        integer NOT NULL DEFAULT 0,
    input_tokens    bigint NOT NULL DEFAULT 0,
    output_tokens   bigint NOT NULL DEFAULT 0,
    payload         bytea,                           -- the answer, byte for byte
    too_large       boolean NOT NULL DEFAULT false,
    error           text,                            -- JSON: code, reason, message, ...
    replays         integer NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX tether_entries_by_age ON tether_entries (started_at);
CREATE INDEX tether_entries_by_seq ON tether_entries (run_id, seq);
CREATE INDEX tether_entries_started ON tether_entries (run_id) WHERE state = 'started';

CREATE TABLE tether_checkpoints (
    run_id   text COLLATE "C" NOT NULL,
    step     bigint NOT NULL,
    state    bytea NOT NULL,
    metadata text NOT NULL,                          -- JSON object of strings
    saved_at double precision NOT NULL,
    PRIMARY KEY (run_id, step)
);
CREATE INDEX tether_checkpoints_by_age ON tether_checkpoints (saved_at);

CREATE FUNCTION tether_journal_next_seq(p_run_id text, p_now double precision)
RETURNS bigint LANGUAGE plpgsql AS $$  -- plpgsql: its plan is kept, a SQL function's is not
DECLARE
    v_seq bigint;
BEGIN
    INSERT INTO tether_runs AS r (run_id, created_at, updated_at, calls)
    VALUES (p_run_id, p_now, p_now, 1)
    ON CONFLICT (run_id) DO UPDATE SET calls = r.calls + 1, updated_at = excluded.updated_at
    RETURNING calls INTO v_seq;
    RETURN v_seq;
END $$;

CREATE FUNCTION tether_journal_begin(
    p_run_id text, p_key text, p_request_hash text, p_upstream text, p_operation text,
    p_stream boolean, p_started_at double precision
) RETURNS SETOF tether_entries LANGUAGE plpgsql AS $$
BEGIN
    RETURN QUERY SELECT * FROM tether_entries WHERE run_id = p_run_id AND key = p_key;
    IF FOUND THEN
        RETURN;  -- journaled already: its entry
    END IF;
    BEGIN
        INSERT INTO tether_entries (run_id, key, seq, request_hash, upstream, operation,
                                    stream, state, started_at)
        VALUES (p_run_id, p_key, tether_journal_next_seq(p_run_id, p_started_at),
                p_request_hash, p_upstream, p_operation, p_stream, 'started', p_started_at)
        ON CONFLICT (run_id, key) DO NOTHING;
        IF FOUND THEN
            RETURN;  -- this call's: no row
        END IF;
        RAISE SQLSTATE 'TT001';  -- another writer inserted it first: undo our seq
    EXCEPTION WHEN SQLSTATE 'TT001' THEN
        NULL;
    END;
    RETURN QUERY SELECT * FROM tether_entries WHERE run_id = p_run_id AND key = p_key;
END $$;

CREATE FUNCTION tether_journal_complete(
    p_run_id text, p_key text, p_request_hash text, p_upstream text, p_operation text,
    p_stream boolean, p_started_at double precision, p_state text,
    p_completed_at double precision, p_answered_by text, p_upstream_status integer,
    p_attempts integer, p_input_tokens bigint, p_output_tokens bigint, p_payload bytea,
    p_too_large boolean, p_error text
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    LOOP  -- until one of the two writes lands (the row may vanish or appear between them)
        UPDATE tether_entries SET state = p_state, completed_at = p_completed_at,
            answered_by = p_answered_by, upstream_status = p_upstream_status,
            attempts = p_attempts, input_tokens = p_input_tokens,
            output_tokens = p_output_tokens, payload = p_payload, too_large = p_too_large,
            error = p_error, started_at = p_started_at
        WHERE run_id = p_run_id AND key = p_key;
        IF FOUND THEN
            UPDATE tether_runs SET updated_at = p_completed_at WHERE run_id = p_run_id;
            RETURN;
        END IF;
        BEGIN
            INSERT INTO tether_entries (run_id, key, seq, request_hash, upstream, operation,
                stream, state, started_at, completed_at, answered_by, upstream_status,
                attempts, input_tokens, output_tokens, payload, too_large, error)
            VALUES (p_run_id, p_key, tether_journal_next_seq(p_run_id, p_completed_at),
                p_request_hash, p_upstream, p_operation, p_stream, p_state, p_started_at,
                p_completed_at, p_answered_by, p_upstream_status, p_attempts, p_input_tokens,
                p_output_tokens, p_payload, p_too_large, p_error)
            ON CONFLICT (run_id, key) DO NOTHING;
            IF FOUND THEN
                RETURN;
            END IF;
            RAISE SQLSTATE 'TT001';  -- another writer inserted it first: undo our seq
        EXCEPTION WHEN SQLSTATE 'TT001' THEN
            NULL;
        END;
    END LOOP;
END $$;
"""

MIGRATIONS: tuple[Migration, ...] = (Migration(1, "journal entries, checkpoints, runs", V1),)
VERSION = MIGRATIONS[-1].version


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[int]:
    """Apply the migrations `conn`'s schema lacks; returns the versions applied."""
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))",
                           (LOCK_CLASS,))  # fmt: skip
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} (version integer PRIMARY KEY, "
            "description text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute(f"SELECT coalesce(max(version), 0) FROM {MIGRATIONS_TABLE}")
        row = await cursor.fetchone()
        current = int(row[0]) if row is not None else 0  # type: ignore[call-overload]
        if current > VERSION:
            raise SchemaError(
                f"the journal schema is at version {current}; this sidecar knows up to "
                f"{VERSION} (a newer sidecar migrated it)"
            )
        for migration in MIGRATIONS[current:]:
            await conn.execute(migration.sql.encode())
            await conn.execute(
                f"INSERT INTO {MIGRATIONS_TABLE} (version, description) VALUES (%s, %s)",
                (migration.version, migration.description),
            )
            applied.append(migration.version)
    return applied
