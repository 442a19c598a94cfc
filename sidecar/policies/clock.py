"""Time for policies: a monotonic `now()`, an awaitable `sleep()` and a `timeout()` block,
injectable in tests.

Policies never call `time`, `asyncio.sleep` or `asyncio.timeout` directly, so tests drive
breakers, limiters, budgets, backoff and per-attempt timeouts with `ManualClock` and need no
real sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds, sleeping and timeouts on the same time line."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    def timeout(self, seconds: float) -> contextlib.AbstractAsyncContextManager[object]:
        """A block that raises TimeoutError when it runs longer than `seconds`."""
        ...


class SystemClock:
    """The real clock: `time.monotonic`, `asyncio.sleep` and `asyncio.timeout`."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def timeout(self, seconds: float) -> contextlib.AbstractAsyncContextManager[object]:
        return asyncio.timeout(seconds)


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that moves only when a test calls `advance`; sleepers wake in time order."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), future))
        await future

    @contextlib.asynccontextmanager
    async def timeout(self, seconds: float) -> AsyncIterator[object]:
        """`asyncio.timeout` on this clock: when `seconds` have been advanced through, the
        block is cancelled and raises TimeoutError."""
        async with asyncio.timeout(None) as block:
            loop = asyncio.get_running_loop()

            async def expire() -> None:
                await self.sleep(seconds)
                block.reschedule(loop.time())

            timer = asyncio.ensure_future(expire())
            try:
                yield block
            finally:
                timer.cancel()

    @property
    def sleepers(self) -> int:
        """How many sleeps are pending (cancelled ones excluded)."""
        return sum(1 for *_, f in self._sleepers if not f.done())

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking every sleeper whose time has come, in order."""
        target = self._now + seconds
        while self._sleepers and self._sleepers[0][0] <= target:
            wake_at, _, future = heapq.heappop(self._sleepers)
            self._now = max(self._now, wake_at)
            if not future.done():
                future.set_result(None)
                await asyncio.sleep(0)  # let the sleeper run before time moves on
        self._now = target
        await asyncio.sleep(0)
