"""Circuit breaker: pybreaker's state machine, driven from asyncio, plus what it lacks.

pybreaker supplies the closed/open/half-open machine, its listeners and its storage
interface. Each attempt enters `CircuitBreaker.calling()` by hand (`__enter__` at admission,
`__exit__` with the outcome), so pybreaker's lock is never held across an await. Added here:

- an injectable clock: the storage keeps `opened_at` on the policies' clock and shows
  pybreaker the wall-clock time that makes its own reset-timeout check agree with it;
- at most `half_open_probes` attempts in flight while half-open, counted per state epoch (a
  probe still in flight from an earlier half-open window takes no slot in the next one); the
  others fail fast;
- NEUTRAL outcomes (cancellation, the sidecar's own refusals): pybreaker only knows failure
  and success (its excluded exceptions count as successes), so the storage is frozen while a
  neutral outcome passes through, and counts nothing;
- fail-fast rejections with the delay until the breaker may admit again (`retry_after_s`).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sidecar.config import BreakerPolicy
from sidecar.errors import CircuitOpenError
from sidecar.policies.base import Outcome, Permit, Verdict
from sidecar.policies.clock import Clock

log = logging.getLogger("tether.sidecar.breaker")


def _import_pybreaker() -> ModuleType:
    """pybreaker, imported without the redis client it imports for its optional Redis
    storage (which the sidecar does not use: shared breakers have their own scripts in
    `sidecar.state`). redis-py takes ~70 ms to import, a tenth of the sidecar's start-up;
    it is imported when `state.backend: redis` asks for it."""
    if "pybreaker" in sys.modules or "redis" in sys.modules:
        return importlib.import_module("pybreaker")
    sys.modules["redis"] = None  # type: ignore[assignment]  # `import redis` fails at once
    try:
        return importlib.import_module("pybreaker")
    finally:
        del sys.modules["redis"]


if TYPE_CHECKING:
    import pybreaker
else:
    pybreaker = _import_pybreaker()

CLOSED, OPEN, HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}
# How long a caller refused while probes are in flight should wait before trying again.
PROBE_RETRY_S = 1.0


class _Neutral(Exception):
    """Passed through pybreaker for an outcome that must count neither way."""


class ClockStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage on an injectable clock, and able to record nothing."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(CLOSED)
        self._clock = clock
        self.opened_at_s: float | None = None
        self.frozen = False

    @property
    def opened_at(self) -> datetime | None:
        if self.opened_at_s is None:
            return None
        return datetime.now(UTC) - timedelta(seconds=self._clock.now() - self.opened_at_s)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        self.opened_at_s = self._clock.now()

    def increment_counter(self) -> None:
        if not self.frozen:
            super().increment_counter()

    def reset_counter(self) -> None:
        if not self.frozen:
            super().reset_counter()

    def increment_success_counter(self) -> None:
        if not self.frozen:
            super().increment_success_counter()


class _Listener(pybreaker.CircuitBreakerListener):
    """Counts transitions and logs them; metrics and span events hook in here."""

    def __init__(self, breaker: Breaker) -> None:
        self._breaker = breaker

    def state_change(self, cb: Any, old_state: Any, new_state: Any) -> None:
        old = STATE_NAMES.get(old_state.name, old_state.name) if old_state else "none"
        new = STATE_NAMES.get(new_state.name, new_state.name)
        self._breaker.transitions += 1  # a new epoch: probes of the old one no longer count
        self._breaker._probes = 0
        log.warning("breaker of upstream %r: %s -> %s", self._breaker.upstream, old, new)
        hook = self._breaker.on_transition
        if hook is not None:
            hook(self._breaker.upstream, old, new)


class BreakerPermit:
    """One admitted attempt; `release` reports its outcome to pybreaker, once."""

    __slots__ = ("_breaker", "_cm", "_epoch", "_probe", "_released")

    def __init__(self, breaker: Breaker, cm: Any, probe: bool) -> None:
        self._breaker = breaker
        self._cm = cm
        self._probe = probe
        self._epoch = breaker.transitions  # the state it was admitted in
        self._released = False

    def release(self, outcome: Outcome) -> None:
        if not self._released:
            self._released = True
            self._breaker._finish(self._cm, self._probe, outcome, self._epoch)


class Breaker:
    """A circuit breaker for one upstream."""

    def __init__(self, upstream: str, policy: BreakerPolicy, clock: Clock) -> None:
        self.upstream = upstream
        self.policy = policy
        self.transitions = 0
        # Told of every state change (upstream, old, new): metrics and span events.
        self.on_transition: Callable[[str, str, str], None] | None = None
        self.rejected = 0
        self._clock = clock
        self._storage, self._cb = self._machine()
        self._probes = 0

    def _machine(self) -> tuple[ClockStorage, pybreaker.CircuitBreaker]:
        """A new, closed pybreaker state machine on the policies' clock."""
        storage = ClockStorage(self._clock)
        cb = pybreaker.CircuitBreaker(
            fail_max=self.policy.fail_max,
            reset_timeout=self.policy.reset_timeout_s,
            success_threshold=self.policy.success_threshold,
            exclude=[_Neutral],
            listeners=[_Listener(self)],
            state_storage=storage,
            name=self.upstream,
            throw_new_error_on_trip=False,
        )
        return storage, cb

    @property
    def state(self) -> str:
        """`closed`, `open` or `half_open`."""
        return STATE_NAMES[self._cb.current_state]

    @property
    def failures(self) -> int:
        return self._cb.fail_counter

    def _open_for(self) -> float:
        opened = self._storage.opened_at_s
        if opened is None:
            return 0.0
        return max(0.0, opened + self.policy.reset_timeout_s - self._clock.now())

    def _reject(self, why: str, retry_after_s: float) -> CircuitOpenError:
        self.rejected += 1
        return CircuitOpenError(
            f"circuit breaker of upstream {self.upstream!r} is {why}",
            upstream=self.upstream,
            retry_after_s=retry_after_s,
        )

    def refuses(self, within_s: float = 0.0) -> bool:
        """Whether an attempt `within_s` from now would be refused (open with more time than
        that left, or half-open with its probes in flight), without changing any state."""
        state = self._cb.current_state
        if state == OPEN:
            return self._open_for() > within_s
        return state == HALF_OPEN and self._probes >= self.policy.half_open_probes

    def admit(self) -> Permit:
        """Admit one attempt, or raise CircuitOpenError at once."""
        state = self._cb.current_state
        if state == OPEN and (wait := self._open_for()) > 0:
            raise self._reject("open", wait)
        if state == HALF_OPEN and self._probes >= self.policy.half_open_probes:
            raise self._reject("half-open with its probes in flight", PROBE_RETRY_S)
        cm = self._cb.calling()
        try:
            cm.__enter__()
        except pybreaker.CircuitBreakerError:  # pragma: no cover - checked above
            raise self._reject("open", self._open_for()) from None
        probe = self._cb.current_state == HALF_OPEN
        self._probes += probe
        return BreakerPermit(self, cm, probe)

    def _finish(self, cm: Any, probe: bool, outcome: Outcome, epoch: int) -> None:
        # pybreaker settles an outcome with the state object the attempt was admitted in: one
        # admitted before the state changed (before a trip, by an earlier probe) must count
        # neither way, or it re-opens an open breaker or closes a re-opened one. Its probe
        # slot belonged to that earlier epoch too (reset at the transition): not ours to free.
        current = epoch == self.transitions
        if current:
            self._probes -= probe
        verdict = outcome.verdict if current else Verdict.NEUTRAL
        if verdict is Verdict.SUCCESS:
            cm.__exit__(None, None, None)
        elif verdict is Verdict.FAILURE:
            error = outcome.error or RuntimeError("failure")
            cm.__exit__(type(error), error, error.__traceback__)
        else:
            self._storage.frozen = True
            try:
                cm.__exit__(_Neutral, _Neutral(), None)
            finally:
                self._storage.frozen = False

    def status(self) -> dict[str, float]:
        return {
            "breaker.failures": float(self.failures),
            "breaker.transitions": float(self.transitions),
            "breaker.rejected": float(self.rejected),
            "breaker.open_for_s": self._open_for() if self._cb.current_state == OPEN else 0.0,
        }
