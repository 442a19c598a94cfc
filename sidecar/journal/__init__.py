"""The durable call journal and agent checkpoints: a storage protocol (`base`), the SQL both
stores share (`sql`), the SQLite and PostgreSQL stores, and the recorder the proxy talks to.
`build_store` picks the store `journal.backend` names."""

from __future__ import annotations

from sidecar.config import JournalConfig
from sidecar.journal.base import JournalStore


def build_store(config: JournalConfig) -> JournalStore:
    """The store `journal.backend` names (not opened); each imported only when named."""
    if config.backend == "postgres":
        from sidecar.journal.postgres import PostgresJournal

        return PostgresJournal(config)
    from sidecar.journal.sqlite import SQLiteJournal

    return SQLiteJournal(config)
