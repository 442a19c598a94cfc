"""Circuit breakers shared by every sidecar on one Redis store (`state.backend: redis`).

The breaker's state (closed, open, half-open; consecutive failures; when it opened; probe
slots) lives in Redis and changes only inside scripts (`state.scripts`), on the Redis
server's clock, so a breaker opened by failures seen through one sidecar is open for all.

Admission stays synchronous and costs no round trip: each sidecar keeps a view of the state,
updated by the answers of its own scripts and by what every script publishes (transitions
and changes of the failure count; one subscription per sidecar), so a change anywhere
reaches every replica within a round trip. Outcomes are sent after the attempt, in the
background; a success while the view shows no failures changes nothing and is not sent, so
a healthy upstream's breaker costs no round trip at all. Half-open probes are
slots in Redis: at most `half_open_probes` across all replicas, each claimed by a script
before a probe is let through. A replica claims a slot as the open period ends when it had
calls refused meanwhile (or tripped the breaker itself), else at its first call after it
(that call is refused like any other while probes are taken); a slot unused for
`CLAIM_HOLD_S` is given back, and one whose replica died frees itself after the attempt
timeout.

When the store fails, `on_store_error` decides: `fail_open` (the default) hands the
decisions to this replica's own breaker (this class is a `Breaker`), started closed at
each incident; `fail_closed` refuses every attempt (`StateUnavailableError`, UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from sidecar.config import BreakerPolicy
from sidecar.policies.base import Outcome, Permit, Verdict
from sidecar.policies.breaker import PROBE_RETRY_S, Breaker
from sidecar.policies.clock import Clock
from sidecar.state.store import StateStore, StoreError

log = logging.getLogger("tether.sidecar.breaker")

POLICY = "breaker"
US = 1e6
CLAIM_HOLD_S = 1.0  # a claimed probe slot this replica does not use within this goes back
LEASE_SLACK_S = 5.0  # beyond the attempt timeout, before a dead replica's probe slot frees
VERDICTS = {Verdict.SUCCESS: "s", Verdict.FAILURE: "f", Verdict.NEUTRAL: "n"}


@dataclass(slots=True)
class _View:
    """This replica's view of the shared state; `open_until` on the policies' clock."""

    state: str = "closed"
    epoch: int = 0
    failures: int = 0
    open_until: float = 0.0
    gen: str = ""


@dataclass(slots=True)
class _Claim:
    """A probe slot this replica holds, unused until `until` (policies' clock)."""

    id: str
    gen: str
    epoch: int
    until: float


class SharedBreakerPermit:
    """One admitted attempt; `release` sends its outcome to the store, once."""

    __slots__ = ("_breaker", "_claim", "_epoch", "_gen", "_released")

    def __init__(self, breaker: SharedBreaker, gen: str, epoch: int, claim: str) -> None:
        self._breaker = breaker
        self._gen = gen
        self._epoch = epoch
        self._claim = claim  # the probe slot it holds ('' when not a probe)
        self._released = False

    @property
    def probe(self) -> bool:
        return bool(self._claim)

    def release(self, outcome: Outcome) -> None:
        if not self._released:
            self._released = True
            self._breaker.report(self._gen, self._epoch, self._claim, outcome.verdict)


class SharedBreaker(Breaker):
    """A circuit breaker for one upstream, shared through the store (see the module)."""

    def __init__(
        self,
        upstream: str,
        policy: BreakerPolicy,
        clock: Clock,
        store: StateStore,
        *,
        attempt_timeout_s: float,
    ) -> None:
        super().__init__(upstream, policy, clock)  # the local breaker of fail_open
        self._store = store
        self._keys = [store.key(upstream, "breaker"), store.key(upstream, "probes")]
        self._reset_us = policy.reset_timeout_s * US
        self._lease_us = (CLAIM_HOLD_S + attempt_timeout_s + LEASE_SLACK_S) * US
        self._view = _View()
        self._claims: list[_Claim] = []
        self._claiming = False
        self._demand = False  # an attempt wanted a probe this open period
        self._waker: asyncio.Task[None] | None = None
        store.register(self)
        store.health.on_down.append(self._store_down)

    # -- what the pipeline asks ------------------------------------------------------------

    @property
    def _local(self) -> bool:
        """Whether this replica's own breaker decides (the store is down, fail_open)."""
        return not self._store.health.up and self.policy.on_store_error == "fail_open"

    @property
    def state(self) -> str:
        return super().state if self._local else self._view.state

    @property
    def failures(self) -> int:
        return super().failures if self._local else self._view.failures

    def admit(self) -> Permit:
        health = self._store.health
        if not health.up:
            if self.policy.on_store_error == "fail_closed":
                self.rejected += 1
                raise health.unavailable(self.upstream, POLICY)
            health.fell_back(self.upstream, POLICY)
            return super().admit()
        view = self._view
        if view.state == "closed":
            return SharedBreakerPermit(self, view.gen, view.epoch, "")
        now = self._clock.now()
        if view.state == "open" and view.open_until > now:
            self._demand = True
            raise self._reject("open", view.open_until - now)
        claim = self._take_claim(now)
        if claim is not None:
            return SharedBreakerPermit(self, claim.gen, claim.epoch, claim.id)
        self._demand = True
        self._claim_soon()
        raise self._reject("half-open with its probes in flight", PROBE_RETRY_S)

    def refuses(self, within_s: float = 0.0) -> bool:
        if not self._store.health.up:
            return super().refuses(within_s) if self._local else True
        view = self._view
        if view.state == "open":
            return view.open_until - self._clock.now() > within_s
        return view.state == "half_open" and not self._usable_claims(self._clock.now())

    def status(self) -> dict[str, float]:
        if self._local:
            return super().status()
        view = self._view
        open_for = max(0.0, view.open_until - self._clock.now()) if view.state == "open" else 0.0
        return {
            "breaker.failures": float(view.failures),
            "breaker.transitions": float(self.transitions),
            "breaker.rejected": float(self.rejected),
            "breaker.open_for_s": open_for,
        }

    # -- outcomes and probe slots ------------------------------------------------------------

    def report(self, gen: str, epoch: int, claim: str, verdict: Verdict) -> None:
        """Send an attempt's outcome (and free its probe slot) in the background; a
        success that has no failures to reset costs nothing."""
        if (verdict is Verdict.NEUTRAL and not claim) or not self._store.health.up:
            return  # nothing to count; or the store is down and this outcome is lost
        view = self._view
        if (verdict is Verdict.SUCCESS and not claim and view.state == "closed"
                and not view.failures and (gen, epoch) == (view.gen, view.epoch)):  # fmt: skip
            return
        self._store.spawn(self._send(gen, epoch, claim, VERDICTS[verdict]))

    async def _send(self, gen: str, epoch: int, claim: str, verdict: str) -> None:
        policy = self.policy
        args = [gen, epoch, verdict, claim, policy.fail_max, self._reset_us,
                policy.success_threshold, self._store.channel, self.upstream]  # fmt: skip
        try:
            reply = await self._store.run("breaker_report", self._keys, args,
                                          upstream=self.upstream, policy=POLICY)  # fmt: skip
        except StoreError:
            return
        self.apply(reply)
        if verdict == "f" and self._view.state == "open" and self._view.epoch > epoch:
            self._demand = True  # it opened under this replica's traffic: probe here first

    def _usable_claims(self, now: float) -> list[_Claim]:
        view = self._view
        return [c for c in self._claims
                if c.gen == view.gen and c.epoch == view.epoch and c.until > now]  # fmt: skip

    def _return_stale(self, now: float) -> None:
        """Give back the claims of an earlier state, or unused for CLAIM_HOLD_S."""
        usable = self._usable_claims(now)
        for stale in (c for c in self._claims if c not in usable):
            self.report(stale.gen, stale.epoch, stale.id, Verdict.NEUTRAL)
        self._claims = usable

    def _take_claim(self, now: float) -> _Claim | None:
        self._return_stale(now)
        return self._claims.pop() if self._claims else None

    def _claim_soon(self) -> None:
        if not self._claiming and self._store.health.up:
            self._claiming = True
            self._store.spawn(self._claim())

    async def _claim(self) -> None:
        claim_id = secrets.token_hex(8)
        args = [self._reset_us, self.policy.half_open_probes, claim_id, self._lease_us,
                self._store.channel, self.upstream]  # fmt: skip
        try:
            reply = await self._store.run("breaker_claim", self._keys, args,
                                          upstream=self.upstream, policy=POLICY)  # fmt: skip
            self.apply(reply)
        except StoreError:
            return
        finally:
            self._claiming = False
        if int(reply[5]):
            self._demand = False  # served; a call refused from now on asks again
            until = self._clock.now() + CLAIM_HOLD_S
            self._claims.append(_Claim(claim_id, _text(reply[4]), int(reply[1]), until))
            self._store.spawn(self._give_back_unused(CLAIM_HOLD_S), timer=True)

    async def _give_back_unused(self, after_s: float) -> None:
        await self._clock.sleep(after_s)
        self._return_stale(self._clock.now())

    # -- the view ------------------------------------------------------------------------------

    def read_args(self) -> list[Any]:
        return [self._reset_us]

    def apply(self, reply: list[Any]) -> None:
        """Take the state a script answered or published, unless it is older news."""
        state, epoch, failures, left_us, gen = (
            _text(reply[0]), int(reply[1]), int(reply[2]), int(reply[3]), _text(reply[4])
        )  # fmt: skip
        view = self._view
        if gen == view.gen and epoch <= view.epoch:
            if epoch == view.epoch:
                view.failures = failures
            return
        now = self._clock.now()
        self._view = _View(state, epoch, failures, now + left_us / US, gen)
        self._claims = [c for c in self._claims if c.gen == gen and c.epoch == epoch]
        if state == "open":
            self._demand = False
            self._wake_at_reset(epoch, left_us / US)
        elif state == "half_open" and self._demand:
            self._claim_soon()
        if state != view.state:
            self.transitions += 1
            log.warning("breaker of upstream %r: %s -> %s (shared)", self.upstream,
                        view.state, state)  # fmt: skip
            if self.on_transition is not None:
                self.on_transition(self.upstream, view.state, state)

    def _wake_at_reset(self, epoch: int, delay_s: float) -> None:
        """As the open period ends, claim a probe slot if calls wanted one meanwhile."""
        if self._waker is not None:
            self._waker.cancel()
        self._waker = self._store.spawn(self._wake(epoch, delay_s), timer=True)

    async def _wake(self, epoch: int, delay_s: float) -> None:
        await self._clock.sleep(delay_s)
        view = self._view
        if view.epoch == epoch and view.state == "open" and self._demand:
            self._claim_soon()

    def _store_down(self) -> None:
        """An incident starts: the local breaker of fail_open starts closed."""
        self._storage, self._cb = self._machine()
        self._probes = 0
        self._claims.clear()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
