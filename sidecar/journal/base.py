"""What the journal stores, and the small protocol every storage backend implements.

The semantics (hashing, replay decisions, single flight, in-doubt entries) live in
`sidecar.journal.recorder`; a backend only stores and finds rows, atomically. Every write a
caller awaits is durable when the await returns (committed at the configured `synchronous`
level), except `begin(..., durable=False)`. Calls to idempotent upstreams write no STARTED
mark at all (running one again after a crash is harmless): their entry is written once, by
`complete`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sidecar.errors import JournalUnavailableError

if TYPE_CHECKING:
    from sidecar.telemetry.metrics import Metrics

STORE_LABEL = "journal"  # the `store` label of the tether_store_* metrics


class State(enum.StrEnum):
    STARTED = "started"  # begun; in flight, or in doubt if its process died
    DONE = "done"  # completed with an answer
    FAILED = "failed"  # completed with an error


@dataclass(slots=True)
class StoredError:
    """An error as journaled: enough to raise the same status again on replay."""

    code: str  # grpc.StatusCode name
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    retryable: bool = False


@dataclass(slots=True)
class Entry:
    """One journaled call, identified by (run_id, key)."""

    run_id: str
    key: str
    request_hash: str
    upstream: str
    operation: str
    stream: bool
    state: State
    seq: int = 0
    started_at: float = 0.0
    completed_at: float | None = None
    answered_by: str = ""
    upstream_status: int = 0
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    payload: bytes | None = None
    too_large: bool = False
    error: StoredError | None = None
    replays: int = 0

    @property
    def latency_ms(self) -> float:
        if self.completed_at is None:
            return 0.0
        return (self.completed_at - self.started_at) * 1000


@dataclass(slots=True)
class Completion:
    """How a call ended, to be written into its entry."""

    state: State
    answered_by: str = ""
    upstream_status: int = 0
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    payload: bytes | None = None
    too_large: bool = False
    error: StoredError | None = None


@dataclass(slots=True)
class Checkpoint:
    run_id: str
    step: int
    state: bytes
    metadata: dict[str, str]
    saved_at: float


@dataclass(slots=True)
class RunSummary:
    run_id: str
    created_at: float
    updated_at: float
    calls: int
    latest_step: int
    started: int  # entries begun and not completed: in flight now, or in doubt


@dataclass(slots=True)
class Retention:
    """Counts removed by one retention pass."""

    entries: int = 0
    checkpoints: int = 0
    runs: int = 0


class JournalClosedError(RuntimeError):
    """An operation submitted after the journal closed (or its writer stopped)."""


class StoreDownError(JournalUnavailableError):
    """Refused without reaching the store, known to be down: nothing was written."""


class JournalStore(Protocol):
    """Storage for the journal and checkpoints. All methods are safe to await concurrently."""

    # Told how long each commit took, and whether it had durable writes (metrics).
    observe_commit: Callable[[float, bool], None] | None
    # Told of the store's events (metrics, `count_store_events`): "up" (it answers:
    # opened, or back after an incident), "down" (an incident began: unreachable or too
    # slow), "error" (an operation failed), "refused" (refused at once during an incident).
    observe_store: Callable[[str], None] | None

    @property
    def available(self) -> bool:
        """Whether the store is serving now (readiness): open, and reachable as far as
        the store knows."""
        ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def begin(self, entry: Entry, *, durable: bool) -> Entry | None:
        """Insert `entry` as STARTED unless (run_id, key) exists; returns the existing entry,
        or None when this call inserted it (the caller owns the execution)."""
        ...

    async def restart(self, entry: Entry, *, durable: bool) -> bool:
        """Turn an existing entry back into STARTED for a new execution (retry, re-run);
        False when it is STARTED already by another execution (another process won)."""
        ...

    def may_contain(self, run_id: str, key: str) -> bool:
        """False only when (run_id, key) is surely not stored (answered without I/O)."""
        ...

    async def complete(self, entry: Entry, completion: Completion) -> None:
        """Write the outcome into `entry` (by its run and key), inserting it if absent."""
        ...

    async def forget(self, run_id: str, key: str, *, started_at: float | None = None) -> None:
        """Remove a STARTED entry whose call never reached the upstream; with `started_at`,
        only if it is the mark begun then (a call's own mark, not one left in doubt by
        another). Applied after every operation submitted before it."""
        ...

    async def delete(self, run_id: str, key: str) -> None:
        """Remove an entry whatever its state (an operator's retry)."""
        ...

    async def count_replay(self, run_id: str, key: str) -> None: ...

    async def get(self, run_id: str, key: str) -> Entry | None: ...

    async def entries(self, run_id: str) -> list[Entry]: ...

    async def save_checkpoint(self, checkpoint: Checkpoint) -> None: ...

    async def load_checkpoint(self, run_id: str, step: int | None) -> Checkpoint | None: ...

    async def runs(self, limit: int, after: str) -> list[RunSummary]:
        """Runs ordered by run_id, starting after `after`."""
        ...

    async def run(self, run_id: str) -> RunSummary | None: ...

    async def count_started(self, excluding: Iterable[tuple[str, str]] = ()) -> int:
        """Entries begun and not completed (STARTED), except those of the `(run_id, key)`
        pairs in `excluding` (the calls executing now): the entries in doubt."""
        ...

    async def expire(self, now: float) -> Retention:
        """Apply the retention rules once."""
        ...


def count_store_events(metrics: Metrics) -> Callable[[str], None]:
    """A store's `observe_store`, counting into the tether_store_* metrics (store="journal",
    policy="journal": the metrics the shared state store reports into too)."""
    errors = metrics.store_errors.labels(STORE_LABEL, "", STORE_LABEL)
    refused = metrics.store_fallbacks.labels(STORE_LABEL, "", STORE_LABEL)
    up = metrics.store_up.labels(STORE_LABEL)
    incidents = metrics.store_incidents.labels(STORE_LABEL)

    def observe(event: str) -> None:
        if event == "error":
            errors.inc()
        elif event == "refused":
            refused.inc()
        elif event == "down":
            up.set(0)
            incidents.inc()
        elif event == "up":
            up.set(1)

    return observe
