"""The bulkhead: bounded in-flight calls, a bounded FIFO queue, slots never lost."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar import errors
from sidecar.config import BulkheadPolicy
from sidecar.policies.base import SUCCESS
from sidecar.policies.bulkhead import Bulkhead, BulkheadPermit
from sidecar.policies.clock import ManualClock
from sidecar.policies.deadline import Deadline

UP = "tool"


def bulkhead(clock: ManualClock, **policy: Any) -> Bulkhead:
    return Bulkhead(UP, BulkheadPolicy(**policy), clock)


def forever(clock: ManualClock) -> Deadline:
    return Deadline(clock, None)


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def queue_up(bh: Bulkhead, clock: ManualClock, n: int) -> list[asyncio.Task[BulkheadPermit]]:
    """Start `n` callers one after the other, each queued before the next arrives."""
    tasks = []
    for _ in range(n):
        tasks.append(asyncio.create_task(bh.admit(forever(clock))))
        await settle()
    return tasks


async def test_in_flight_never_exceeds_max() -> None:
    """10x max_in_flight concurrent callers: at most max_in_flight run at once, all finish."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=3, max_queue=100, queue_timeout_s=60.0)
    running = peak = done = 0

    async def call() -> None:
        nonlocal running, peak, done
        permit = await bh.admit(forever(clock))
        running += 1
        peak = max(peak, running)
        assert bh.in_flight <= 3
        await clock.sleep(1.0)
        running -= 1
        permit.release(SUCCESS)
        done += 1

    tasks = [asyncio.create_task(call()) for _ in range(30)]
    await settle()
    assert bh.in_flight == 3 and bh.queued == 27
    for _ in range(10):
        await clock.advance(1.0)
        await settle()
        assert bh.in_flight <= 3
    await asyncio.gather(*tasks)
    assert peak == 3 and done == 30
    assert bh.in_flight == 0 and bh.queued == 0 and bh.rejected == 0


async def test_queued_callers_are_served_in_fifo_order() -> None:
    """Queued callers get their slots in arrival order."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=1, max_queue=5)
    holder = await bh.admit(forever(clock))
    order: list[int] = []

    async def call(i: int) -> None:
        permit = await bh.admit(forever(clock))
        order.append(i)
        await clock.sleep(0.125)
        permit.release(SUCCESS)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(call(i)))
        await settle()
    assert bh.queued == 5
    holder.release(SUCCESS)
    for _ in range(5):
        await settle()
        await clock.advance(0.125)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]
    assert bh.in_flight == 0


async def test_newcomer_cannot_overtake_the_queue() -> None:
    """A released slot goes to the oldest waiter; a caller arriving then must queue."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=2, max_queue=5)
    first = await bh.admit(forever(clock))
    await bh.admit(forever(clock))
    (waiter,) = await queue_up(bh, clock, 1)
    first.release(SUCCESS)
    assert bh.in_flight == 2 and bh.queued == 0  # passed on, not freed
    (newcomer,) = await queue_up(bh, clock, 1)
    assert waiter.done() and not newcomer.done()
    assert bh.queued == 1
    newcomer.cancel()
    await settle()


async def test_overflow_is_rejected_at_once() -> None:
    """Beyond max_in_flight + max_queue a caller is refused at once with OverloadedError."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=1, max_queue=2, queue_timeout_s=2.0)
    await bh.admit(forever(clock))
    waiters = await queue_up(bh, clock, 2)
    with pytest.raises(errors.OverloadedError) as info:
        await bh.admit(forever(clock))
    assert info.value.upstream == UP and info.value.retry_after_s == 2.0
    assert bh.rejected == 1 and bh.queued == 2 and bh.in_flight == 1
    for task in waiters:
        task.cancel()
    await settle()
    assert bh.queued == 0


async def test_no_queue_rejects_when_full() -> None:
    """With max_queue 0 nobody waits: a full bulkhead refuses at once."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=1, max_queue=0)
    permit = await bh.admit(forever(clock))
    with pytest.raises(errors.OverloadedError):
        await bh.admit(forever(clock))
    permit.release(SUCCESS)
    (await bh.admit(forever(clock))).release(SUCCESS)
    assert bh.in_flight == 0 and clock.sleepers == 0


async def test_queue_timeout_rejects_and_leaves_the_queue() -> None:
    """A waiter not served within queue_timeout_s is refused and leaves the queue."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=1, max_queue=2, queue_timeout_s=2.0)
    holder = await bh.admit(forever(clock))
    (waiter,) = await queue_up(bh, clock, 1)
    assert clock.sleepers == 1
    await clock.advance(1.875)
    await settle()
    assert not waiter.done()
    await clock.advance(0.125)
    await settle()
    with pytest.raises(errors.OverloadedError):
        await waiter
    assert bh.queued == 0 and bh.rejected == 1
    holder.release(SUCCESS)
    assert bh.in_flight == 0  # the slot was not handed to the waiter that left


async def test_deadline_caps_the_queue_wait() -> None:
    """The caller's deadline, when shorter, ends the queue wait."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=1, max_queue=2, queue_timeout_s=2.0)
    await bh.admit(forever(clock))
    waiter = asyncio.create_task(bh.admit(Deadline.after(clock, 0.5)))
    await settle()
    await clock.advance(0.5)
    await settle()
    with pytest.raises(errors.OverloadedError):
        await waiter
    assert bh.queued == 0


async def test_cancelled_waiter_leaves_the_queue() -> None:
    """A waiter cancelled before its turn leaves the queue and takes no slot."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=1, max_queue=2)
    holder = await bh.admit(forever(clock))
    (waiter,) = await queue_up(bh, clock, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bh.queued == 0 and clock.sleepers == 0
    holder.release(SUCCESS)
    assert bh.in_flight == 0


async def test_waiter_cancelled_after_handover_passes_the_slot_on() -> None:
    """A waiter cancelled once its slot was handed over passes it on; no slot is lost."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=1, max_queue=3)
    holder = await bh.admit(forever(clock))
    first, second = await queue_up(bh, clock, 2)
    holder.release(SUCCESS)
    assert bh.queued == 1 and bh.in_flight == 1  # the slot is now first's
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    permit = await asyncio.wait_for(second, timeout=1.0)
    assert bh.in_flight == 1 and bh.queued == 0
    permit.release(SUCCESS)
    assert bh.in_flight == 0


async def test_last_waiter_cancelled_after_handover_frees_the_slot() -> None:
    """With nobody left to pass it to, a handed-over slot of a cancelled waiter is freed."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=1, max_queue=3)
    holder = await bh.admit(forever(clock))
    (waiter,) = await queue_up(bh, clock, 1)
    holder.release(SUCCESS)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert bh.in_flight == 0 and bh.queued == 0
    (await bh.admit(forever(clock))).release(SUCCESS)
    assert bh.in_flight == 0


async def test_releasing_a_permit_twice_has_no_effect() -> None:
    """A second release frees nothing and hands no extra slot to the queue."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=1, max_queue=3)
    permit = await bh.admit(forever(clock))
    first, second = await queue_up(bh, clock, 2)
    permit.release(SUCCESS)
    permit.release(SUCCESS)
    await settle()
    assert first.done() and not second.done()
    assert bh.in_flight == 1 and bh.queued == 1
    lone = bulkhead(clock, max_in_flight=2)
    p = await lone.admit(forever(clock))
    await lone.admit(forever(clock))
    p.release(SUCCESS)
    p.release(SUCCESS)
    assert lone.in_flight == 1
    second.cancel()
    await settle()


async def test_status_gauges() -> None:
    """`status` reports in-flight, queued and rejected calls."""
    clock = ManualClock()
    bh = bulkhead(clock, max_in_flight=1, max_queue=1)
    await bh.admit(forever(clock))
    (waiter,) = await queue_up(bh, clock, 1)
    with pytest.raises(errors.OverloadedError):
        await bh.admit(forever(clock))
    assert bh.status() == {
        "bulkhead.in_flight": 1.0,
        "bulkhead.queued": 1.0,
        "bulkhead.rejected": 1.0,
    }
    waiter.cancel()
    await settle()
