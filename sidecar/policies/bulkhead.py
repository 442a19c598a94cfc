"""Bulkhead: at most `max_in_flight` calls at the upstream, at most `max_queue` waiting.

A call beyond both bounds is refused at once (OVERLOADED); a queued call waits in FIFO order
at most `queue_timeout_s` (and never past its deadline). A released slot passes straight to
the oldest waiter, so nobody can overtake the queue.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from sidecar.config import BulkheadPolicy
from sidecar.errors import OverloadedError
from sidecar.policies.base import Outcome
from sidecar.policies.clock import Clock
from sidecar.policies.deadline import Deadline


class BulkheadPermit:
    """One slot; released once."""

    __slots__ = ("_bulkhead", "_released")

    def __init__(self, bulkhead: Bulkhead) -> None:
        self._bulkhead = bulkhead
        self._released = False

    def release(self, outcome: Outcome) -> None:
        if not self._released:
            self._released = True
            self._bulkhead._release()


class Bulkhead:
    """Bounded concurrency and a bounded FIFO queue for one upstream."""

    def __init__(self, upstream: str, policy: BulkheadPolicy, clock: Clock) -> None:
        self.upstream = upstream
        self.policy = policy
        self.in_flight = 0
        self.rejected = 0
        self._clock = clock
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def _overloaded(self, why: str) -> OverloadedError:
        self.rejected += 1
        return OverloadedError(
            f"upstream {self.upstream!r} is overloaded: {why}",
            upstream=self.upstream,
            retry_after_s=self.policy.queue_timeout_s,
        )

    async def admit(self, deadline: Deadline) -> BulkheadPermit:
        """A slot now, or after waiting in the queue; OverloadedError when neither fits."""
        if self.in_flight < self.policy.max_in_flight and not self._waiters:
            self.in_flight += 1
            return BulkheadPermit(self)
        if len(self._waiters) >= self.policy.max_queue:
            raise self._overloaded(f"{self.in_flight} in flight and {self.queued} queued")
        timeout, _ = deadline.cap(self.policy.queue_timeout_s)
        await self._wait_for_slot(timeout)
        return BulkheadPermit(self)

    async def _wait_for_slot(self, timeout_s: float) -> None:
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(slot)
        timer = asyncio.ensure_future(self._clock.sleep(timeout_s))
        try:
            await asyncio.wait((slot, timer), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._abandon(slot)
            raise
        finally:
            timer.cancel()
        if not slot.done():
            self._abandon(slot)
            raise self._overloaded(f"no slot within {timeout_s:.3f} s in the queue")

    def _abandon(self, slot: asyncio.Future[None]) -> None:
        """Leave the queue; a slot handed over meanwhile is passed on, not lost."""
        if slot.done() and not slot.cancelled():
            self._release()
            return
        slot.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(slot)

    def _release(self) -> None:
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)  # the slot passes to this waiter: in_flight unchanged
                return
        self.in_flight -= 1

    def status(self) -> dict[str, float]:
        return {
            "bulkhead.in_flight": float(self.in_flight),
            "bulkhead.queued": float(self.queued),
            "bulkhead.rejected": float(self.rejected),
        }
