"""What the pipeline works with: a route (one upstream, the model it is asked for, and its
gates), a call's plan (the routes that may take it), the permits of an admission, and what a
call leaves behind (attempts, the observer, a stream's answering upstream and usage).

An upstream's route is named after it and asks for its `model` (or the caller's, without
one). A route target that asks the same upstream for another model gets a route of its own,
named `upstream/model`, with its own breaker, rate limiter and bulkhead (built from the
upstream's policies): one model failing on a provider does not trip another one, and a
provider's per-model rate limits are kept per model. The connection pool is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import orjson

from sidecar import errors
from sidecar.config import Config
from sidecar.policies.base import Outcome, Permit
from sidecar.policies.bulkhead import Bulkhead
from sidecar.policies.clock import Clock
from sidecar.policies.gates import make_breaker, make_limiter
from sidecar.policies.retry import Retrier
from sidecar.state.store import StateStore
from sidecar.telemetry.calls import NULL_OBSERVER, CallObserver
from sidecar.upstreams.base import Upstream, UpstreamRequest, UpstreamResponse, Usage


class Route:
    """One upstream with its gates, retrier, fallbacks and counters."""

    def __init__(
        self,
        name: str,
        upstream: Upstream,
        config: Config,
        clock: Clock,
        state: StateStore | None = None,
        model: str | None = None,
    ) -> None:
        spec = config.upstreams[upstream.name]
        policies = spec.policies
        self.name = name
        self.upstream = upstream
        self.clock = clock
        # what the provider is asked for: the route target's model, the upstream's, or None
        # (the caller's model as sent)
        self.model = model or spec.model
        self.attempt_timeout_s = spec.attempt_timeout_s
        # Streams: the wait for the first chunk and each gap after it (else per attempt).
        self.first_chunk_timeout_s = policies.stream.first_chunk_timeout_s or spec.attempt_timeout_s
        self.idle_timeout_s = policies.stream.idle_timeout_s or spec.attempt_timeout_s
        self.idempotent = spec.is_idempotent
        self.continuation = spec.continuation if spec.kind == "model" else "none"
        self.prefill_params = spec.prefill_params
        self.total_timeout_s = policies.total_timeout_s  # a call's whole budget
        self.fallback_names = list(policies.fallback)
        # itself, then its fallbacks in order (set by `Pipeline`)
        self.plan = Plan((self,), budget_s=self.total_timeout_s)
        self.limiter = (
            make_limiter(name, policies.rate_limit, clock, state) if policies.rate_limit else None
        )
        self.bulkhead = Bulkhead(name, policies.bulkhead, clock) if policies.bulkhead else None
        timeout_s = spec.attempt_timeout_s  # a probe slot's lease, in a shared breaker
        self.breaker = (
            make_breaker(name, policies.breaker, clock, state, attempt_timeout_s=timeout_s)
            if policies.breaker
            else None
        )
        self.retrier = (
            Retrier(name, policies.retry, clock, idempotent=spec.is_idempotent)
            if policies.retry
            else None
        )
        self.counts_tokens = bool(self.limiter and self.limiter.tokens and spec.kind == "model")
        self.calls = 0
        self.errors = 0
        self.in_flight = 0
        self.fallbacks_used = 0

    def rewrite(self, request: UpstreamRequest) -> UpstreamRequest:
        """`request` as this route sends it: `model` set to the route's model (the payload
        re-encoded only when the caller asked for another one)."""
        model, body = self.model, request.body
        if model is None or not isinstance(body, dict) or body.get("model") == model:
            return request
        body = {**body, "model": model}
        return replace(request, body=body, payload=orjson.dumps(body))

    def gauges(self) -> dict[str, float]:
        gauges: dict[str, float] = {}
        retrier = self.retrier if self.retrier is not None and self.retrier.enabled else None
        for part in (self.limiter, self.bulkhead, self.breaker, retrier):
            if part is not None:
                gauges.update(part.status())
        return gauges


@dataclass(frozen=True, slots=True)
class Plan:
    """Which routes may take a call, in order, the one that takes a call the others refused
    as longer than their context window, and the call's whole budget (`total_timeout_s`)."""

    candidates: tuple[Route, ...]
    context: Route | None = None
    budget_s: float | None = None

    @property
    def journal_idempotent(self) -> bool:
        """How the journal treats the call: idempotent only if every route that may take
        it is."""
        return all(route.idempotent for route in self.candidates) and (
            self.context is None or self.context.idempotent
        )

    def after(self, target: Route) -> Route | None:
        """The candidate after `target`, if any (the context fallback has none)."""
        if target is self.context:
            return None
        index = self.candidates.index(target) + 1
        return self.candidates[index] if index < len(self.candidates) else None


@dataclass(slots=True)
class Admission:
    """The gate permits of one call on one route, released together with its outcome."""

    route: Route
    permits: list[Permit]

    def release(self, outcome: Outcome) -> None:
        for permit in reversed(self.permits):
            permit.release(outcome)
        self.permits = []


@dataclass(slots=True)
class CallResult:
    response: UpstreamResponse
    upstream: str
    attempts: int


@dataclass(slots=True)
class CallTrace:
    """Filled while a call runs: upstream attempts begun so far (0: nothing was sent), and
    the observer told what happens (spans, metrics)."""

    attempts: int = 0
    observer: CallObserver = NULL_OBSERVER


@dataclass(slots=True)
class StreamInfo(CallTrace):
    """Filled while a stream runs: which upstream answered, after how many attempts."""

    upstream: str = ""
    usage: Usage | None = None
    flowing: bool = False  # a first chunk has arrived


def timed_out(route: Route, timeout_s: float, by_caller: bool) -> errors.UpstreamError:
    """The error of an attempt on `route` cut after `timeout_s` (by the caller's deadline,
    or by the route's own timeout)."""
    return errors.UpstreamTimeoutError(
        f"upstream {route.name!r} did not answer within {timeout_s:.3f} s",
        upstream=route.name,
        caller_deadline=by_caller,
    )


def error_reason(exc: BaseException) -> str:
    """A short, bounded reason for a failure: the HTTP status, else the error's kind."""
    status = getattr(exc, "http_status", 0)
    if status >= 400:  # an error status; a 200 whose body broke is a bad response
        return str(status)
    return type(exc).__name__.removeprefix("Upstream").removesuffix("Error").lower()
