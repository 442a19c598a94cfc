"""Incidents of the shared state store: noticed once, counted, logged once, recovered.

The first failed or timed-out store operation starts an incident: the store is marked down,
one warning is logged, and until it recovers no call touches the store (each policy decides
alone, by its `on_store_error`). A background probe tries the store every
`state.retry_after_s`; its first success ends the incident (one more log line) and the
policies go back to the shared state. So a dead store costs at most one call `timeout_s`,
at the start of each incident.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from sidecar.errors import StateUnavailableError
from sidecar.telemetry.metrics import Metrics

log = logging.getLogger("tether.sidecar.state")


class StoreObserver(Protocol):
    """Where store events are counted (the sidecar's metrics)."""

    def store_error(self, store: str, upstream: str, policy: str) -> None: ...

    def store_fallback(self, store: str, upstream: str, policy: str) -> None: ...

    def store_up(self, store: str, up: bool) -> None: ...


class _NullObserver:
    def store_error(self, store: str, upstream: str, policy: str) -> None:
        pass

    def store_fallback(self, store: str, upstream: str, policy: str) -> None:
        pass

    def store_up(self, store: str, up: bool) -> None:
        pass


class StoreMetrics:
    """Store events as the sidecar's metrics (`sidecar.telemetry.metrics`)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def store_error(self, store: str, upstream: str, policy: str) -> None:
        self._metrics.store_errors.labels(store, upstream, policy).inc()

    def store_fallback(self, store: str, upstream: str, policy: str) -> None:
        self._metrics.store_fallbacks.labels(store, upstream, policy).inc()

    def store_up(self, store: str, up: bool) -> None:
        self._metrics.store_up.labels(store).set(1 if up else 0)
        if not up:
            self._metrics.store_incidents.labels(store).inc()


class StoreHealth:
    """Whether the store answers, and the incident when it does not."""

    def __init__(
        self,
        name: str,
        where: str,
        retry_after_s: float,
        probe: Callable[[], Awaitable[Any]],
    ) -> None:
        self.name = name  # the metrics' `store` label: "redis"
        self.where = where  # the store's address, without credentials
        self.retry_after_s = retry_after_s
        self.observer: StoreObserver = _NullObserver()
        self.up = True
        self.incidents = 0
        self.on_down: list[Callable[[], None]] = []  # told when an incident starts
        self.on_up: list[Callable[[], None]] = []  # told when it ends
        self._probe = probe
        self._prober: asyncio.Task[None] | None = None
        self._down_since = 0.0
        self._errors = 0
        self._fallbacks = 0

    def observe(self, observer: StoreObserver) -> None:
        """Count the store's events with `observer` from now on."""
        self.observer = observer
        if self.up:
            observer.store_up(self.name, True)

    def failed(self, exc: BaseException, upstream: str, policy: str) -> None:
        """A store operation failed or timed out: count it; the first one starts an incident."""
        self._errors += 1
        self.observer.store_error(self.name, upstream, policy)
        if not self.up:
            return
        self.up = False
        self.incidents += 1
        self._down_since = time.monotonic()
        self._errors, self._fallbacks = 1, 0
        self.observer.store_up(self.name, False)
        log.warning(
            "shared state store %s failed (%s); policies follow their on_store_error until it "
            "answers again (trying every %.1f s)", self.where, describe(exc), self.retry_after_s
        )  # fmt: skip
        for hook in self.on_down:
            hook()
        self._start_probe()

    def fell_back(self, upstream: str, policy: str) -> None:
        """A call was decided without the store (locally, or refused by fail_closed)."""
        self._fallbacks += 1
        self.observer.store_fallback(self.name, upstream, policy)

    def unavailable(self, upstream: str, policy: str) -> StateUnavailableError:
        """The refusal of a `fail_closed` policy while the store is down."""
        self.fell_back(upstream, policy)
        return StateUnavailableError(
            f"the shared state store {self.where} is unavailable and the {policy.replace('_', ' ')}"
            f" of upstream {upstream!r} fails closed (on_store_error: fail_closed)",
            upstream=upstream,
            store=self.name,
            policy=policy,
            retry_after_s=self.retry_after_s,
        )

    def recovered(self) -> None:
        """The store answered again: end the incident."""
        if self.up:
            return
        self.up = True
        self.observer.store_up(self.name, True)
        log.warning(
            "shared state store %s is back after %.1f s (%d failed operations, %d calls "
            "decided without it)", self.where, time.monotonic() - self._down_since,
            self._errors, self._fallbacks
        )  # fmt: skip
        for hook in self.on_up:
            hook()

    def _start_probe(self) -> None:
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        while not self.up:
            await asyncio.sleep(self.retry_after_s)
            try:
                await self._probe()
            except Exception as exc:  # still down: try again later
                log.debug("shared state store %s still unavailable: %s", self.where, exc)
                continue
            self.recovered()

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None


def describe(exc: BaseException) -> str:
    """An error's kind and text, short and without credentials (redis errors carry none)."""
    text = str(exc) or "no answer"
    if isinstance(exc, TimeoutError):
        text = "timed out"
    return f"{type(exc).__name__}: {text[:200]}"
