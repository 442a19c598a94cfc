"""Shared rate limits and breakers on the machine's Redis: replicas in one process, each with
its own store client (its own connections and subscription), as separate sidecars would be."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio

from sidecar import errors
from sidecar.config import BreakerPolicy, RateLimitPolicy, StateConfig
from sidecar.policies import shared_breaker
from sidecar.policies.base import NEUTRAL, SUCCESS, Outcome, Verdict
from sidecar.policies.clock import SYSTEM_CLOCK, Clock
from sidecar.policies.deadline import Deadline
from sidecar.policies.shared_breaker import SharedBreaker
from sidecar.policies.shared_ratelimit import SharedRateLimiter
from sidecar.state.resp import ScriptClient
from sidecar.state.store import StateStore
from sidecar.upstreams.base import Usage
from tests.redis_support import key_prefix, redis_url

__all__ = ["key_prefix", "redis_url"]  # fixtures

pytestmark = pytest.mark.services
UP = "llm"
FAILURE = Outcome(Verdict.FAILURE, errors.UpstreamUnavailableError("down", upstream=UP))


class OffsetClock:
    """The system clock, `offset_s` ahead: a replica whose clock is wrong."""

    def __init__(self, offset_s: float) -> None:
        self.offset_s = offset_s

    def now(self) -> float:
        return SYSTEM_CLOCK.now() + self.offset_s

    async def sleep(self, seconds: float) -> None:
        await SYSTEM_CLOCK.sleep(seconds)


Stores = Callable[..., Awaitable[StateStore]]


@pytest.fixture
async def stores(redis_url: str, key_prefix: str) -> AsyncIterator[Stores]:
    """Make started stores (one per replica) on the test's key prefix; closed at the end."""
    made: list[StateStore] = []

    async def make(**settings: Any) -> StateStore:
        settings.setdefault("timeout_s", 2.0)  # a loaded test machine is no store incident
        config = StateConfig(backend="redis", url=redis_url, key_prefix=key_prefix, **settings)
        store = StateStore(config, redis_url)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


def limiter(store: StateStore, clock: Clock = SYSTEM_CLOCK, **policy: Any) -> SharedRateLimiter:
    policy.setdefault("mode", "reject")
    return SharedRateLimiter(UP, RateLimitPolicy(**policy), clock, store)


def breaker(store: StateStore, clock: Clock = SYSTEM_CLOCK, **policy: Any) -> SharedBreaker:
    return SharedBreaker(UP, BreakerPolicy(**policy), clock, store, attempt_timeout_s=5)


def forever() -> Deadline:
    return Deadline(SYSTEM_CLOCK, None)


async def admitted(rl: SharedRateLimiter, estimate: int = 0) -> bool:
    try:
        await rl.admit(estimate, forever())
    except errors.RateLimitedError:
        return False
    return True


async def eventually(check: Callable[[], bool], timeout_s: float = 2.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


async def test_replicas_share_one_request_bucket(stores: Stores) -> None:
    """Two replicas of a 1/s limit with burst 6 admit 6 between them, then refuse with the
    delay until the next slot (a second at most)."""
    a = limiter(await stores(), requests_per_s=1, burst=6)
    b = limiter(await stores(), requests_per_s=1, burst=6)
    results = [await admitted(rl) for rl in (a, b) * 4]
    assert results == [True] * 6 + [False] * 2
    with pytest.raises(errors.RateLimitedError) as info:
        await b.admit(0, forever())
    assert info.value.retry_after_s is not None and 0 < info.value.retry_after_s <= 1
    assert a.status()["rate_limit.requests_available"] == pytest.approx(0, abs=0.5)


async def test_token_reservation_is_settled_for_every_replica(stores: Stores) -> None:
    """A's 500-token estimate settled at 100 real tokens leaves B 500 of a 600/min bucket;
    then B is refused and told when 10 tokens free (one second at 10 a second)."""
    a = limiter(await stores(), tokens_per_min=600)
    b = limiter(await stores(), tokens_per_min=600)
    permit = await a.admit(500, forever())
    assert not await admitted(b, 200)  # the estimate is reserved: 100 left
    permit.release(Outcome(Verdict.SUCCESS, usage=Usage(input_tokens=60, output_tokens=40)))
    await eventually(lambda: not a._store.pending)  # the settlement ran in the background
    assert await admitted(b, 500)
    with pytest.raises(errors.RateLimitedError) as info:
        await b.admit(10, forever())
    assert info.value.retry_after_s == pytest.approx(1.0, abs=0.1)


async def test_denied_call_takes_nothing_and_failures_refund(stores: Stores) -> None:
    """A call denied on tokens takes no request slot; a failure without usage gives its
    whole estimate back."""
    a = limiter(await stores(), requests_per_s=1, burst=3, tokens_per_min=600)
    (await a.admit(400, forever())).release(FAILURE)
    await eventually(lambda: not a._store.pending)
    await a.admit(550, forever())  # the 400 came back: 600 were there
    assert not await admitted(a, 100)  # tokens short: refused, request slot kept
    assert await admitted(a, 0)  # the third request of the burst is still there


async def test_wait_mode_reserves_the_next_shared_slot(stores: Stores) -> None:
    """In mode wait, B waits for the slot after A's burst (~0.2 s at 5/s) and is admitted;
    a cancelled waiter gives its slot back."""
    a = limiter(await stores(), requests_per_s=5, burst=1, mode="wait", max_wait_s=1)
    b = limiter(await stores(), requests_per_s=5, burst=1, mode="wait", max_wait_s=1)
    await a.admit(0, forever())
    started = time.monotonic()
    await b.admit(0, forever())
    assert 0.12 < time.monotonic() - started < 0.35
    waiting = asyncio.create_task(a.admit(0, forever()))  # would wait ~0.2 s
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await eventually(lambda: not a._store.pending)
    started = time.monotonic()
    await b.admit(0, forever())  # the cancelled slot was given back: ~0.15 s, not ~0.35 s
    assert time.monotonic() - started < 0.3


async def test_breaker_opened_at_one_replica_refuses_at_the_others(stores: Stores) -> None:
    """fail_max failures seen by A open the breaker for B and C within a round trip; their
    refusals carry what is left of reset_timeout_s."""
    a, b, c = [breaker(await stores(), fail_max=3, reset_timeout_s=30) for _ in range(3)]
    for store in (a._store, b._store, c._store):
        await store.start()
    for _ in range(2):
        a.admit().release(FAILURE)
    b.admit().release(FAILURE)  # consecutive failures are counted across replicas
    await eventually(lambda: a.state == b.state == c.state == "open")
    for replica in (b, c):
        with pytest.raises(errors.CircuitOpenError) as info:
            replica.admit()
        assert info.value.retry_after_s == pytest.approx(30, abs=1)
    assert c.status()["breaker.open_for_s"] == pytest.approx(30, abs=1)


async def test_a_success_anywhere_resets_the_failure_count(stores: Stores) -> None:
    """Failures are consecutive across replicas: B hears of A's failure, and a success at
    B resets A's count. Successes with no failures to reset are not sent at all."""
    a, b = [breaker(await stores(), fail_max=2) for _ in range(2)]
    for replica in (a, b):
        await replica._store.start()
    b.admit().release(SUCCESS)
    assert not b._store.pending  # nothing to reset: no round trip
    a.admit().release(FAILURE)
    await eventually(lambda: b.failures == 1)
    b.admit().release(SUCCESS)
    await eventually(lambda: not b._store.pending)
    a.admit().release(FAILURE)
    await eventually(lambda: not a._store.pending)
    assert a.state == "closed" and a.failures == 1


async def test_half_open_admits_its_probes_across_replicas(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After reset_timeout_s, three replicas that all want to probe get two probe slots
    between them; a success closes the breaker everywhere, unused slots go back."""
    monkeypatch.setattr(shared_breaker, "CLAIM_HOLD_S", 0.3)
    replicas = [breaker(await stores(), fail_max=1, reset_timeout_s=0.3, half_open_probes=2)
                for _ in range(3)]  # fmt: skip
    for replica in replicas:
        await replica._store.start()
    replicas[0].admit().release(FAILURE)
    await eventually(lambda: all(r.state == "open" for r in replicas))
    for replica in replicas:  # each wants a probe
        with pytest.raises(errors.CircuitOpenError):
            replica.admit()
    await asyncio.sleep(0.4)  # the claims are made as the open period ends
    await eventually(lambda: sum(len(r._claims) for r in replicas) == 2)
    probes = []
    for replica in replicas * 3:
        with contextlib.suppress(errors.CircuitOpenError):
            probes.append(replica.admit())
    assert len(probes) == 2
    probes[0].release(SUCCESS)
    await eventually(lambda: all(r.state == "closed" for r in replicas))
    probes[1].release(NEUTRAL)  # admitted in the half-open epoch: counts neither way


async def test_probe_failure_reopens_and_stale_outcomes_count_neither_way(
    stores: Stores,
) -> None:
    """A failed probe re-opens the breaker for all; an outcome admitted before a transition
    (here a success from the closed epoch) does not close it."""
    a, b = [breaker(await stores(), fail_max=1, reset_timeout_s=0.2) for _ in range(2)]
    for replica in (a, b):
        await replica._store.start()
    old = b.admit()  # admitted while closed
    a.admit().release(FAILURE)
    await eventually(lambda: b.state == "open")
    with pytest.raises(errors.CircuitOpenError):
        a.admit()  # A wants the probe
    await eventually(lambda: bool(a._claims), timeout_s=1.0)
    probe = a.admit()
    probe.release(FAILURE)
    await eventually(lambda: a.state == b.state == "open" and b._view.epoch == 3)
    old.release(SUCCESS)
    await eventually(lambda: not b._store.pending)
    assert "closed" not in (a.state, b.state)  # (it may be half-open again by now)


async def test_clock_skew_of_a_replica_changes_nothing(stores: Stores) -> None:
    """A replica whose clock runs 30 s ahead shares the same buckets and breaker as one on
    time: same admissions, same retry delays, same open period (time is Redis's)."""
    ahead, on_time = OffsetClock(30.0), SYSTEM_CLOCK
    skewed_store, true_store = await stores(), await stores()
    skewed = limiter(skewed_store, ahead, requests_per_s=2, burst=4)
    true = limiter(true_store, on_time, requests_per_s=2, burst=4)
    assert [await admitted(skewed) for _ in range(4)] == [True] * 4
    with pytest.raises(errors.RateLimitedError) as info:
        await true.admit(0, forever())
    assert info.value.retry_after_s is not None and 0 < info.value.retry_after_s <= 0.5
    await asyncio.sleep(1.0)  # two slots free, whoever takes them
    assert [await admitted(true), await admitted(skewed), await admitted(true)] == [
        True, True, False]  # fmt: skip
    late, early = (breaker(s, clock, fail_max=1, reset_timeout_s=0.3)
                   for s, clock in ((skewed_store, ahead), (true_store, on_time)))  # fmt: skip
    for store in (skewed_store, true_store):
        await store.start()
    late.admit().release(FAILURE)
    await eventually(lambda: early.state == "open")
    for replica in (late, early):
        assert replica.status()["breaker.open_for_s"] == pytest.approx(0.3, abs=0.1)
        with pytest.raises(errors.CircuitOpenError):
            replica.admit()
    await asyncio.sleep(0.35)
    await eventually(lambda: bool(late._claims or early._claims), timeout_s=1.0)
    prober = late if late._claims else early
    prober.admit().release(SUCCESS)
    await eventually(lambda: late.state == early.state == "closed")


async def test_scripts_come_back_after_a_script_flush(stores: Stores, redis_url: str) -> None:
    """EVALSHA of a script Redis forgot (a restart, SCRIPT FLUSH) loads it again."""
    a = limiter(await stores(), requests_per_s=100)
    assert await admitted(a)
    client = redis.asyncio.Redis.from_url(redis_url)
    await client.script_flush()
    await client.aclose()
    assert await admitted(a)
    assert a._store.up


async def test_a_lost_breaker_state_is_taken_as_closed(stores: Stores, redis_url: str) -> None:
    """When Redis loses the breaker's keys (restarted empty), the replicas' views follow the
    store: closed, and the failures count again from zero."""
    a = breaker(await stores(), fail_max=1, reset_timeout_s=30)
    a.admit().release(FAILURE)
    await eventually(lambda: a.state == "open")
    client = redis.asyncio.Redis.from_url(redis_url)
    await client.delete(*a._keys)
    await client.aclose()
    await a._store.resync()
    assert a.state == "closed"
    a.admit().release(FAILURE)
    await eventually(lambda: a.state == "open")


async def test_pipelined_answers_reach_their_callers_under_timeouts(redis_url: str) -> None:
    """3000 script calls in flight on the one connection, many given up at random moments:
    every answer that arrives reaches the caller that asked for it."""
    client = ScriptClient(redis_url, {"echo": "return ARGV[1]"})
    rng = random.Random(7)
    outcomes = {"right": 0, "wrong": 0, "gave up": 0}

    async def one(token: str) -> None:
        try:
            async with asyncio.timeout(rng.choice([0.0002, 0.001, 5, 5])):
                answer = await client.call("echo", [], [token])
        except TimeoutError:
            outcomes["gave up"] += 1
            return
        outcomes["right" if answer == token.encode() else "wrong"] += 1

    try:
        for batch in range(3):
            await asyncio.gather(*(one(f"t{batch}-{i}") for i in range(1000)))
    finally:
        client.reset()
    assert outcomes["wrong"] == 0 and outcomes["right"] > 1000 and outcomes["gave up"] > 0
