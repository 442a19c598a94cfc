"""PostgreSQL for tests: the machine's server (skipped or failed when missing, see
`tests.conftest.require_service`), a fresh schema per test (dropped afterwards), the journal
backends the journal tests run over, and a TCP proxy that can cut or stall the store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from tests.conftest import require_service

POSTGRES_DSN = os.environ.get("TETHER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _reachable(dsn: str) -> str | None:
    """None when PostgreSQL answers at `dsn`, else why not."""
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"no PostgreSQL at {dsn}: {str(exc).strip().splitlines()[0]}"
    return None


def require_postgres() -> str:
    """The machine's PostgreSQL DSN; skip (or fail under TETHER_REQUIRE_SERVICES=1) without."""
    why = _reachable(POSTGRES_DSN)
    require_service("postgres", why is None, why or "")
    return POSTGRES_DSN


@dataclass
class Schema:
    """A schema of the test's own: `dsn` puts it first on the search path."""

    name: str
    dsn: str

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.execute(sql.encode(), args)
            return cursor.fetchall() if cursor.description is not None else []

    def with_host(self, host: str, port: int) -> str:
        """The DSN with another address (a proxy in front of the server)."""
        return make_conninfo(self.dsn, host=host, port=str(port))

    def terminate_backends(self) -> int:
        """End every server connection of this schema's sidecars (pg_terminate_backend)."""
        rows = self.query(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = %s AND pid <> pg_backend_pid()",
            (self.name,),
        )
        return int(rows[0][0])


@contextlib.contextmanager
def fresh_schema() -> Iterator[Schema]:
    """A new schema on the machine's server, dropped with everything in it afterwards."""
    admin = require_postgres()
    name = f"tt_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}".encode())
    # application_name: the sidecars' connections, findable by the test (pg_stat_activity)
    dsn = make_conninfo(admin, options=f"-c search_path={name}", application_name=name)
    try:
        yield Schema(name, dsn)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(f"DROP SCHEMA {name} CASCADE".encode())


@dataclass
class JournalBackend:
    """The journal store a test runs against: `config` is the `journal` config section
    (SQLite's file path is left to the test's harness)."""

    name: str
    config: dict[str, Any]
    schema: Schema | None = None

    def states(self, run_id: str, sqlite_path: Path | None = None) -> dict[str, str]:
        """Each journaled key of the run and its state, read from the store itself (an
        SQLite file passes `PRAGMA integrity_check` first)."""
        sql = "SELECT key, state FROM {} WHERE run_id = ?"
        if self.schema is not None:
            rows = self.schema.query(sql.format("tether_entries").replace("?", "%s"), (run_id,))
            return {key: state for key, state in rows}
        assert sqlite_path is not None
        with contextlib.closing(sqlite3.connect(sqlite_path)) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            return dict(db.execute(sql.format("entries"), (run_id,)).fetchall())


@contextlib.contextmanager
def journal_backend(name: str) -> Iterator[JournalBackend]:
    """`sqlite`, or `postgres` on a fresh schema (required as a service)."""
    if name == "sqlite":
        yield JournalBackend("sqlite", {"backend": "sqlite"})
        return
    with fresh_schema() as schema:
        yield JournalBackend("postgres", {"backend": "postgres", "dsn": schema.dsn}, schema)


@dataclass
class StoreProxy:
    """A TCP proxy in front of PostgreSQL, run on a test's loop thread: `mode` forward
    (pass through), refuse (close each new connection at once) or stall (accept, never
    answer); `cut()` drops the connections open now."""

    target: tuple[str, int]
    mode: str = "forward"
    port: int = 0
    _server: asyncio.Server | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)

    @classmethod
    def to(cls, dsn: str) -> StoreProxy:
        params = conninfo_to_dict(dsn)
        return cls((str(params.get("host", "127.0.0.1")), int(params.get("port", 5432))))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await self.cut()
        if self._server is not None:
            self._server.close()

    async def cut(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "refuse":
            writer.transport.abort()
            return
        self._open.add(writer)
        if self.mode == "stall":
            await reader.read()  # until the client gives up
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open.add(up_writer)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.transport.abort()
