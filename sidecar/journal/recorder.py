"""Journal semantics: replay, single flight, in-doubt entries; storage-agnostic.

A call with a `run_id` and an idempotency key is *claimed* before it runs:

- a completed entry with the same request hash is a **replay**: its answer (or its permanent
  error) is returned byte for byte, without the upstream or any policy;
- the same key with another request hash is a **non-deterministic replay** (FAILED_PRECONDITION);
- a call with the same key already running in this sidecar is **joined**: it runs once, and
  the others get its outcome when that outcome lasts (an answer, a permanent error); when it
  does not (a transient error, a cancelled or abandoned call) they claim the key again, so a
  caller never inherits another caller's transient failure;
- an entry begun but never completed by a process that died is **in doubt**: re-executed for
  idempotent upstreams, refused with OUTCOME_UNKNOWN for the others until an operator
  resolves it (`tether runs resolve`);
- otherwise this call **executes**, and its outcome is written before it is acknowledged.

For a non-idempotent upstream the STARTED mark is durable before the upstream is called, so
a crash can never make the sidecar execute it twice; a failure that may have reached the
upstream (timeout, reset, cancellation mid-call) leaves it in doubt rather than retryable. A
call cancelled before anything was sent (even while its mark was being written) removes its
own mark. Whether a call is idempotent for the journal is decided by the caller
(`Plan.journal_idempotent`: every route that may take the call).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from sidecar import errors, status
from sidecar.config import JournalConfig
from sidecar.journal.base import (
    Completion,
    Entry,
    JournalStore,
    State,
    StoredError,
    StoreDownError,
)
from sidecar.pipeline import may_have_executed as _may_have_executed
from sidecar.policies.base import Verdict, verdict_of
from sidecar.routes import CallTrace
from sidecar.upstreams.base import Usage

log = logging.getLogger("tether.sidecar.journal")

Key = tuple[str, str]
T = TypeVar("T")


def request_hash(upstream: str, operation: str, stream: bool, payload: bytes) -> str:
    """The identity of a request: upstream, operation, unary or stream, payload."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{upstream}\0{operation}\0{int(stream)}\0".encode())
    digest.update(payload)
    return digest.hexdigest()


@dataclass(slots=True)
class Ident:
    """Who a call is in the journal."""

    run_id: str
    key: str
    upstream: str
    operation: str
    stream: bool
    request_hash: str

    @property
    def id(self) -> Key:
        return (self.run_id, self.key)


@dataclass(slots=True)
class Claim:
    """What to do with a journaled call: replay `entry`, or execute (then settle)."""

    recorder: Recorder
    ident: Ident
    idempotent: bool
    entry: Entry | None = None  # set: answer from this entry
    trace: CallTrace = field(default_factory=CallTrace)
    fresh: Entry | None = None  # the entry this execution writes

    @property
    def replay(self) -> bool:
        return self.entry is not None

    async def settle(self, completion: Completion) -> None:
        await self.recorder._settle(self, completion)

    async def fail(self, exc: BaseException) -> None:
        await self.recorder._fail(self, exc)

    async def abandon(self) -> None:
        """The caller vanished mid-call (or cannot say what happened): forgotten if running
        it again is harmless (an idempotent upstream, or no attempt reached it), else left in
        doubt. Joined callers claim the key again."""
        try:
            if self.idempotent or self.trace.attempts == 0:
                own = None if self.idempotent or self.fresh is None else self.fresh.started_at
                await self.recorder._io(self.recorder._forget(self.ident, own))
        finally:
            self.recorder._release(self.ident)


def stored_error(exc: BaseException, retryable: bool) -> StoredError:
    code, message, _details = status.to_rich_status(exc)
    reason = status.classify(exc)[1]
    metadata = exc.metadata() if isinstance(exc, errors.SidecarError) else {}
    return StoredError(code.name, reason, message, metadata, retryable)


def may_have_executed(exc: BaseException, trace: CallTrace) -> bool:
    """Whether a failed call may still have had its effect at the upstream (see
    `sidecar.pipeline.may_have_executed`)."""
    return _may_have_executed(exc, trace.attempts)


def lasting(entry: Entry) -> bool:
    """Whether an outcome is shared with the callers that joined it: an answer, or an error
    that replay would return as it is. Others (a transient error) make them claim again."""
    if entry.state is State.DONE:
        return True
    return entry.state is State.FAILED and entry.error is not None and not entry.error.retryable


class Recorder:
    """Claims, replays and settles journaled calls over a `JournalStore`."""

    def __init__(self, store: JournalStore, config: JournalConfig) -> None:
        self.store = store
        self.config = config
        self.replays = 0
        self.in_doubt = 0
        self.too_large = 0
        self.joined = 0
        # Keys executing in this process; their future carries the outcome to joined
        # callers (an Entry), or None: claim the key again.
        self._running: dict[Key, asyncio.Future[Entry | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        if hasattr(store, "siblings"):  # SQLite's writer waits for them to group commits
            store.siblings = self._running.__len__

    def running_keys(self, run_id: str) -> set[str]:
        """Keys of `run_id` executing in this process now."""
        return {key for run, key in self._running if run == run_id}

    async def claim(self, ident: Ident, *, idempotent: bool) -> Claim:
        """Decide between replay and execution (raising for in-doubt and mismatched keys)."""
        joined = False
        while (running := self._running.get(ident.id)) is not None:
            if not joined:
                self.joined += 1
                joined = True
            outcome = await asyncio.shield(running)
            if outcome is not None:
                return self._replayed(ident, outcome, idempotent)
            # The call we waited on left no lasting outcome: claim the key again.
        future: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
        self._running[ident.id] = future
        fresh = Entry(ident.run_id, ident.key, ident.request_hash, ident.upstream,
                      ident.operation, ident.stream, State.STARTED,
                      started_at=time.time())  # fmt: skip
        try:
            claim = await self._claim_stored(ident, idempotent, fresh)
        except errors.JournalError as exc:
            if isinstance(exc, errors.JournalUnavailableError) and not (
                idempotent or isinstance(exc, StoreDownError)
            ):
                # A failed `begin` or `restart` may have written this call's STARTED mark
                # anyway (a store that timed out after it committed): nothing was sent, so
                # remove the mark if the store lets us, then let joined callers claim again.
                self._forget_then_release(ident, fresh)
            else:
                self._release(ident)
            raise
        except BaseException as exc:
            if isinstance(exc, Exception) or idempotent:
                self._release(ident)
            else:
                # Cancelled while `begin` or `restart` was queued: either may still write
                # this call's STARTED mark, and nothing was sent. Remove the mark (queued
                # after them), then let joined callers claim again.
                self._forget_then_release(ident, fresh)
            raise
        if claim.entry is not None:
            self._release(ident, claim.entry)
        return claim

    def _forget(self, ident: Ident, started_at: float | None) -> Awaitable[None]:
        """Remove the key's STARTED mark: only the one begun at `started_at` (this call's
        own, never another process's mark in doubt) unless it is None."""
        return self.store.forget(ident.run_id, ident.key, started_at=started_at)

    def _forget_then_release(self, ident: Ident, fresh: Entry) -> None:
        task = asyncio.ensure_future(self._forget(ident, fresh.started_at))
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.warning("journal: could not remove the mark of call %r of run %r (never "
                            "sent): %s", ident.key, ident.run_id, task.exception())  # fmt: skip
            self._release(ident)

        task.add_done_callback(done)

    async def _claim_stored(self, ident: Ident, idempotent: bool, fresh: Entry) -> Claim:
        execute = Claim(self, ident, idempotent, fresh=fresh)
        if idempotent:
            # No STARTED mark: running it again after a crash is harmless. Most keys are
            # new, and the store's filter says so without a read.
            if not self.store.may_contain(ident.run_id, ident.key):
                return execute
            existing = await self._io(self.store.get(ident.run_id, ident.key))
        else:
            existing = await self._io(self.store.begin(fresh, durable=True))
        while existing is not None:
            if existing.request_hash != ident.request_hash:
                raise errors.NonDeterministicReplayError(
                    f"non-deterministic replay: key {ident.key!r} of run {ident.run_id!r} was "
                    f"journaled with request {existing.request_hash}, this call is "
                    f"{ident.request_hash} (upstream, operation or payload changed)"
                )
            if not self._reexecute(existing, idempotent):
                return self._replayed(ident, existing, idempotent, count=True)
            if idempotent or await self._io(self.store.restart(fresh, durable=True)):
                return execute
            # Another process (sharing the store) restarted the key first: look again.
            existing = await self._io(self.store.begin(fresh, durable=True))
        return execute

    def _reexecute(self, entry: Entry, idempotent: bool) -> bool:
        """Whether a stored entry is run again instead of answered (or refused)."""
        if entry.state is State.FAILED:
            return entry.error is not None and entry.error.retryable
        if entry.state is State.DONE:
            if not entry.too_large:
                return False
            if idempotent:
                return True
            raise self._outcome_unknown(entry, "completed, but its answer was too large to keep")
        if idempotent:
            return True  # begun by a process that died: harmless to run again
        self.in_doubt += 1
        raise self._outcome_unknown(entry, "begun but never completed (the process died)")

    def _outcome_unknown(self, entry: Entry, why: str) -> errors.OutcomeUnknownError:
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.started_at))
        return errors.OutcomeUnknownError(
            f"outcome unknown: call {entry.key!r} of run {entry.run_id!r} to upstream "
            f"{entry.upstream!r} was {why}; started {started}. Resolve it with "
            f"`tether runs resolve {entry.run_id} {entry.key} --result FILE | --retry`",
            run_id=entry.run_id,
            key=entry.key,
            upstream=entry.upstream,
        )

    def _replayed(self, ident: Ident, entry: Entry, idempotent: bool, count: bool = False) -> Claim:
        if entry.request_hash != ident.request_hash:
            raise errors.NonDeterministicReplayError(
                f"non-deterministic replay: key {ident.key!r} is running with request "
                f"{entry.request_hash}, this call is {ident.request_hash}"
            )
        if entry.state is State.FAILED and entry.error is not None:
            self.replays += count
            error = entry.error
            raise errors.JournaledError(
                error.message, code=error.code, reason=error.reason, metadata=error.metadata
            )
        self.replays += count
        if count:
            self._count_later(entry)
        return Claim(self, ident, idempotent, entry=entry)

    async def _io(self, awaitable: Awaitable[T]) -> T:
        """A store operation; its failures become JournalUnavailableError (fail closed)."""
        try:
            return await awaitable
        except errors.SidecarError:
            raise
        except Exception as exc:
            raise errors.JournalUnavailableError(f"the journal failed: {exc}") from exc

    def _count_later(self, entry: Entry) -> None:
        task = asyncio.ensure_future(self.store.count_replay(entry.run_id, entry.key))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def _release(self, ident: Ident, entry: Entry | None = None) -> None:
        """The key is free: joined callers get `entry` if it lasts, else claim again."""
        future = self._running.pop(ident.id, None)
        if future is None or future.done():
            return
        future.set_result(entry if entry is not None and lasting(entry) else None)

    async def _settle(self, claim: Claim, completion: Completion) -> None:
        ident = claim.ident
        answer = completion.payload  # what joined callers get, even when too large to keep
        if completion.payload is not None and len(completion.payload) > self.config.max_entry_bytes:
            completion.payload, completion.too_large = None, True
            self.too_large += 1
        try:
            assert claim.fresh is not None
            await self._io(self.store.complete(claim.fresh, completion))
        except BaseException:
            self._release(ident)
            raise
        c = completion
        entry = Entry(ident.run_id, ident.key, ident.request_hash, ident.upstream,
                      ident.operation, ident.stream, c.state, answered_by=c.answered_by,
                      upstream_status=c.upstream_status, attempts=c.attempts,
                      input_tokens=c.input_tokens, output_tokens=c.output_tokens,
                      payload=answer, error=c.error)  # fmt: skip
        self._release(ident, entry)

    async def _fail(self, claim: Claim, exc: BaseException) -> None:
        """Journal a failed execution: retryable, permanent, or left in doubt."""
        ident = claim.ident
        if not isinstance(exc, Exception):  # cancelled
            await claim.abandon()
            return
        try:
            if not claim.idempotent and may_have_executed(exc, claim.trace):
                return  # STARTED stays: in doubt
            retryable = transient(exc)
            completion = Completion(State.FAILED, attempts=claim.trace.attempts,
                                    error=stored_error(exc, retryable))  # fmt: skip
            await self._settle(claim, completion)
        finally:
            self._release(ident)


def transient(exc: BaseException) -> bool:
    """Whether a journaled failure is run again on replay (else replayed as is)."""
    if isinstance(exc, errors.PolicyError | errors.JournalError):
        return True
    if isinstance(exc, errors.UpstreamTimeoutError):
        return True
    return verdict_of(exc) is not Verdict.SUCCESS


def usage_of(completion: Completion) -> Usage:
    return Usage(completion.input_tokens, completion.output_tokens)
