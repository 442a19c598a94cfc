"""The policy pipeline: every proxied and guarded call passes the same gates in one order.

    deadline > rate limit > bulkhead > circuit breaker > retry (each attempt: breaker
    admission and accounting + the upstream call, under the per-attempt timeout) > fallback

- deadline: the caller's gRPC deadline, one absolute point; every wait and attempt is capped
  by what is left of it, and no retry starts past it.
- rate limit, bulkhead: taken once per call (a queued call waits within its deadline) and held
  until the call ends, retries included; released with the outcome, which settles tokens.
- breaker: admits or refuses each attempt; each attempt's outcome is counted (the sidecar's
  own refusals and the caller's cancellation are neutral, see `policies.base.verdict_of`).
  An attempt counts (`CallTrace.attempts`, `attempts` of results and errors) once admitted.
- retry: retryable failures, within `max_attempts`, the budget and the deadline, after a
  full-jitter backoff that honours Retry-After. When the breaker would refuse the next
  attempt (it tripped on this one), the last upstream error is returned at once.
- fallback: when the upstream is open, rate limited, overloaded, or failed after its
  retries, the next upstream of the call's `Plan` (the route's `fallback` list, else the
  upstream's `policies.fallback`) takes the call with its own gates; but never after a
  failure that may have executed on a non-idempotent upstream (a timeout, a reset:
  `may_have_executed`), which would risk doing its effect twice. An upstream that timed out
  is not retried when a fallback can take the call: a silent upstream costs one timeout.
  A request refused as longer than the model's context window is not retried anywhere but
  on the plan's context fallback, when it has one.

This module only composes the policies in `sidecar/policies/`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

from sidecar import errors
from sidecar.config import Config, RouteTarget, target_model
from sidecar.policies.base import NEUTRAL, Permit, outcome_of, succeeded
from sidecar.policies.clock import SYSTEM_CLOCK, Clock
from sidecar.policies.deadline import Deadline
from sidecar.policies.fallback import falls_back
from sidecar.policies.ratelimit import estimate_tokens
from sidecar.recovery import recovering
from sidecar.routes import (
    Admission,
    CallResult,
    CallTrace,
    Plan,
    Route,
    StreamInfo,
    error_reason,
    timed_out,
)
from sidecar.state.store import StateStore, build_state
from sidecar.streams import OpenStream, close_chunks
from sidecar.telemetry.calls import NULL_OBSERVER, CallObserver
from sidecar.upstreams.base import Chunk, Upstream, UpstreamRequest, UpstreamResponse

log = logging.getLogger("tether.sidecar.pipeline")
T = TypeVar("T")


class Pipeline:
    """Runs calls through the policies of their upstream and its fallbacks."""

    def __init__(
        self,
        config: Config,
        upstreams: dict[str, Upstream],
        clock: Clock = SYSTEM_CLOCK,
        state: StateStore | None = None,
    ):
        self.clock = clock
        # Shared limits and breakers (state.backend: redis): the store given, else one built
        # from the config (started and closed by the server); None: all in this process.
        self.state = state if state is not None else build_state(config)
        self._config, self._upstreams = config, upstreams
        self.routes = {
            name: Route(name, up, config, clock, self.state) for name, up in upstreams.items()
        }
        for route in list(self.routes.values()):
            targets = [RouteTarget(upstream=name) for name in route.fallback_names]
            route.plan = self.plan(RouteTarget(upstream=route.name), targets)
        self.model_plans = self._model_plans(config)

    def target(self, target: RouteTarget) -> Route:
        """The route of `target`: its upstream's own, or the route of another model on that
        upstream (`upstream/model`, made once, with gates of its own)."""
        route = self.routes[target.upstream]
        model = target_model(self._config, target)
        if model == route.model:
            return route
        name = f"{target.upstream}/{model}"
        if name not in self.routes:
            upstream = self._upstreams[target.upstream]
            route = Route(name, upstream, self._config, self.clock, self.state, model)
            self.routes[name] = route
        return self.routes[name]

    def plan(
        self,
        primary: RouteTarget,
        fallback: list[RouteTarget],
        context: RouteTarget | None = None,
        budget_s: float | None = None,
    ) -> Plan:
        """The plan of a call to `primary`: then `fallback` in order; `context` takes a call
        refused as too long for the others' context windows; `budget_s`: the call's whole
        budget (None: the primary upstream's `total_timeout_s`)."""
        first = self.target(primary)
        candidates = (first, *(self.target(other) for other in fallback))
        budget_s = budget_s or first.total_timeout_s
        return Plan(candidates, self.target(context) if context else None, budget_s)

    def _model_plans(self, config: Config) -> dict[str, Plan]:
        """Model name -> plan of the HTTP front: the configured routes (a route's own
        `fallback` list replaces its upstream's), else every callable model upstream."""
        if config.routes:
            plans = {}
            for model, route in config.routes.items():
                fallback = route.fallback
                if fallback is None:
                    names = self.routes[route.upstream].fallback_names
                    fallback = [RouteTarget(upstream=name) for name in names]
                plans[model] = self.plan(route.primary, fallback, route.context_fallback,
                                         route.total_timeout_s)  # fmt: skip
            return plans
        return {name: self.routes[name].plan for name, spec in config.upstreams.items()
                if spec.kind == "model" and spec.type != "guarded"}  # fmt: skip

    def deadline(self, timeout_s: float | None, budget_s: float | None = None) -> Deadline:
        """The call's deadline: the caller's (`timeout_s`), or the plan's budget when the
        caller set none, or the tighter of the two."""
        return Deadline.within(self.clock, timeout_s, budget_s)

    # -- admission, shared by proxied and guarded calls ------------------------------------

    async def admit(
        self,
        route: Route,
        request: UpstreamRequest,
        deadline: Deadline,
        observer: CallObserver = NULL_OBSERVER,
    ) -> Admission:
        """Rate limit, then bulkhead; the permits are held until `Admission.release`."""
        route.calls += 1
        admission = Admission(route, [])
        try:
            if route.limiter is not None:
                estimate = estimate_tokens(request.body) if route.counts_tokens else 0
                started = self.clock.now()
                admission.permits.append(await route.limiter.admit(estimate, deadline))
                _waited(observer, route, "rate_limit.wait", self.clock.now() - started)
            if route.bulkhead is not None:
                started = self.clock.now()
                admission.permits.append(await route.bulkhead.admit(deadline))
                _waited(observer, route, "bulkhead.queued", self.clock.now() - started)
        except BaseException as exc:
            admission.release(outcome_of(exc))
            route.errors += 1
            refusal = REFUSAL_EVENTS.get(type(exc))
            if refusal is not None:
                observer.event(refusal, route.name)
            raise
        return admission

    # -- unary calls ------------------------------------------------------------------------

    async def call(
        self,
        route: Route,
        request: UpstreamRequest,
        deadline: Deadline,
        trace: CallTrace | None = None,
        plan: Plan | None = None,
    ) -> CallResult:
        """The call on `route`, else on the other routes of its plan (`route.plan` unless
        given) in order."""
        if trace is None:
            trace = CallTrace()
        start = trace.attempts

        def attempt(target: Route, fails_over: bool) -> Awaitable[CallResult]:
            return self._call_route(target, request, deadline, trace, fails_over)

        result = await self._on_candidates(plan or route.plan, deadline, trace, attempt)
        result.attempts = trace.attempts - start
        return result

    async def _on_candidates(
        self,
        plan: Plan,
        deadline: Deadline,
        trace: CallTrace,
        attempt: Callable[[Route, bool], Awaitable[T]],
    ) -> T:
        """`attempt` on the plan's first route, then on the next ones while the failures
        allow it; the last failure carries the attempts of every candidate. `attempt`'s
        second argument: whether a timed-out attempt should fail over rather than retry."""
        start = trace.attempts
        target: Route | None = plan.candidates[0]
        while target is not None:
            before = trace.attempts
            following = plan.after(target)
            try:
                return await attempt(target, following is not None and target.idempotent)
            except errors.SidecarError as exc:
                tried = trace.attempts - before
                following = self._next_candidate(plan, target, following, exc, deadline, tried)
                if following is None:
                    _set_attempts(exc, trace.attempts - start)
                    raise
                plan.candidates[0].fallbacks_used += 1
                trace.observer.event("fallback", target.name, reason=error_reason(exc))
            target = following
        raise AssertionError("unreachable: the last candidate re-raises")  # pragma: no cover

    def _next_candidate(
        self,
        plan: Plan,
        target: Route,
        following: Route | None,
        exc: errors.SidecarError,
        deadline: Deadline,
        attempts: int,
    ) -> Route | None:
        """The route to try after `target` failed with `exc` after `attempts` attempts of
        its own: `following`, the context fallback, or none."""
        if isinstance(exc, errors.UpstreamClientError) and exc.context_exceeded:
            context = plan.context
            if context is None or target is context or deadline.expired():
                return None
            log.info("upstream %r: the request exceeds its context window; passing it to %r",
                     target.name, context.name)  # fmt: skip
            return context
        if following is None:
            return None
        if not target.idempotent and may_have_executed(exc, attempts):
            log.info("upstream %r may have executed the call (%s); not idempotent, so no "
                     "fallback", target.name, type(exc).__name__)  # fmt: skip
            return None
        if not falls_back(exc, deadline):
            return None
        log.info("upstream %r failed (%s); falling back", target.name, type(exc).__name__)
        return following

    async def _call_route(
        self,
        route: Route,
        request: UpstreamRequest,
        deadline: Deadline,
        trace: CallTrace,
        fails_over: bool,
    ) -> CallResult:
        request = route.rewrite(request)
        admission = await self.admit(route, request, deadline, trace.observer)
        route.in_flight += 1
        start = trace.attempts
        outcome = NEUTRAL
        try:
            result = await self._attempts(route, request, deadline, trace, fails_over)
            outcome = succeeded(result.response.usage)
            return result
        except BaseException as exc:
            outcome = outcome_of(exc)
            route.errors += 1
            if isinstance(exc, errors.SidecarError):
                _set_attempts(exc, trace.attempts - start)
            raise
        finally:
            route.in_flight -= 1
            admission.release(outcome)

    async def _attempts(
        self,
        route: Route,
        request: UpstreamRequest,
        deadline: Deadline,
        trace: CallTrace,
        fails_over: bool,
    ) -> CallResult:
        if route.retrier is not None:
            route.retrier.budget.record_call()
        start, timeouts = trace.attempts, 0
        while True:
            try:
                response = await self._attempt(route, request, deadline, trace, start)
            except errors.UpstreamError as exc:
                timeouts += _silent(exc)
                tried = trace.attempts - start
                await self._before_retry(route, exc, tried, deadline, trace, fails_over, timeouts)
                continue
            return CallResult(response, route.name, trace.attempts - start)

    async def _before_retry(
        self,
        route: Route,
        exc: errors.UpstreamError,
        attempts: int,
        deadline: Deadline,
        trace: CallTrace,
        fails_over: bool,
        timeouts: int,
    ) -> None:
        """Sleep the backoff before the next attempt, or re-raise `exc` when none is due:
        not retryable, attempts or budget spent, a Retry-After beyond `backoff_max_s`, a
        backoff past the deadline, a breaker that would refuse the next attempt, or a
        timeout of the upstream's own (the call's `timeouts`-th) when a fallback can take
        the call (`fails_over`) or after `timeout_retries` retries of timeouts."""
        retrier = route.retrier
        if (
            retrier is None
            or not retrier.enabled
            or attempts >= retrier.policy.max_attempts
            or not retrier.retryable(exc)
            or (_silent(exc) and (fails_over or timeouts > retrier.policy.timeout_retries))
        ):
            raise exc
        delay = retrier.delay_s(exc, attempts)
        if delay is None or (route.breaker is not None and route.breaker.refuses(delay)):
            raise exc
        left = deadline.remaining()
        if left is not None and delay >= left:
            raise exc
        if not retrier.budget.try_spend():
            trace.observer.event("retry.budget_exhausted", route.name)
            log.warning("retry budget of upstream %r exhausted: not retrying", route.name)
            raise exc
        reason = error_reason(exc)
        trace.observer.event("retry.scheduled", route.name, attempt=attempts, delay_s=delay,
                             reason=reason)  # fmt: skip
        log.info("retrying upstream %r in %.3f s after %s", route.name, delay, reason)
        trace.observer.exclude(delay)  # a backoff sleep is not the sidecar's overhead
        await self.clock.sleep(delay)

    def _admit_attempt(self, route: Route, trace: CallTrace, start: int) -> Permit | None:
        """The breaker's permit for one attempt (CircuitOpenError when refused); an admitted
        attempt is counted, and counted as a retry when it is not the route's first."""
        try:
            permit = route.breaker.admit() if route.breaker is not None else None
        except errors.CircuitOpenError:
            trace.observer.event("breaker.rejected", route.name)
            raise
        if trace.attempts > start and route.retrier is not None:
            route.retrier.retries += 1
        trace.attempts += 1
        return permit

    async def _attempt(
        self,
        route: Route,
        request: UpstreamRequest,
        deadline: Deadline,
        trace: CallTrace,
        start: int,
    ) -> UpstreamResponse:
        """One attempt: breaker admission, the call under its timeout, breaker accounting."""
        permit = self._admit_attempt(route, trace, start)
        span = trace.observer.attempt_start(route.name, trace.attempts)
        timeout_s, by_caller = deadline.cap(route.attempt_timeout_s)
        try:
            async with self.clock.timeout(timeout_s):
                response = await route.upstream.call(request)
        except TimeoutError:
            exc = timed_out(route, timeout_s, by_caller)
            _attempt_failed(trace, span, permit, exc)
            raise exc from None
        except BaseException as exc:
            _attempt_failed(trace, span, permit, exc)
            raise
        if permit is not None:
            permit.release(succeeded(response.usage))
        trace.observer.attempt_end(span, response, None)
        return response

    # -- streams -----------------------------------------------------------------------------

    async def stream(
        self,
        route: Route,
        request: UpstreamRequest,
        deadline: Deadline,
        info: StreamInfo,
        plan: Plan | None = None,
        opening: Deadline | None = None,
    ) -> AsyncGenerator[Chunk, None]:
        """The chunks of the call on `route` or another route of its plan. Failures before
        the first chunk are retried and fall back like unary calls, within `opening` (the
        deadline of getting the stream flowing; else `deadline`); after it, the stream is
        recovered where it can be (`sidecar.recovery`), else it ends with the failure.
        `deadline` bounds the whole stream."""
        opening = opening or deadline

        def attempt(target: Route, fails_over: bool) -> Awaitable[OpenStream]:
            return self._open_route(target, request, opening, info, fails_over)

        plan = plan or route.plan
        opened = await self._on_candidates(plan, opening, info, attempt)
        recovered = recovering(opened, plan, request, deadline, info, self._take_over)
        async with aclosing(recovered) as rest:
            async for chunk in rest:
                yield chunk

    def _take_over(
        self, route: Route, request: UpstreamRequest, opening: Deadline, info: StreamInfo
    ) -> Awaitable[OpenStream]:
        """Open `route`'s stream to take over one that failed (`sidecar.recovery`)."""
        return self._open_route(route, request, opening, info, fails_over=True)

    async def _open_route(
        self,
        route: Route,
        request: UpstreamRequest,
        deadline: Deadline,
        info: StreamInfo,
        fails_over: bool,
    ) -> OpenStream:
        request = route.rewrite(request)
        admission = await self.admit(route, request, deadline, info.observer)
        if route.retrier is not None:
            route.retrier.budget.record_call()
        route.in_flight += 1
        start, timeouts = info.attempts, 0
        try:
            while True:
                try:
                    return await self._open_attempt(
                        route, request, deadline, admission, info, start
                    )
                except errors.UpstreamError as exc:
                    timeouts += _silent(exc)
                    tried = info.attempts - start
                    await self._before_retry(route, exc, tried, deadline, info, fails_over,
                                             timeouts)  # fmt: skip
        except BaseException as exc:
            route.in_flight -= 1
            route.errors += 1
            admission.release(outcome_of(exc))
            if isinstance(exc, errors.SidecarError):
                _set_attempts(exc, info.attempts - start)
            raise

    def _first_chunk_error(
        self, route: Route, caught: BaseException, timeout_s: float, by_caller: bool
    ) -> BaseException:
        if isinstance(caught, TimeoutError):
            return timed_out(route, timeout_s, by_caller)
        if isinstance(caught, StopAsyncIteration):
            return errors.UpstreamBadResponseError(
                f"upstream {route.name!r} ended its stream without a chunk", upstream=route.name
            )
        return caught

    async def _open_attempt(
        self,
        route: Route,
        request: UpstreamRequest,
        deadline: Deadline,
        admission: Admission,
        info: StreamInfo,
        start: int,
    ) -> OpenStream:
        permit = self._admit_attempt(route, info, start)
        span = info.observer.attempt_start(route.name, info.attempts)
        timeout_s, by_caller = deadline.cap(route.first_chunk_timeout_s)
        chunks = route.upstream.stream(request)
        try:
            async with self.clock.timeout(timeout_s):
                first = await anext(chunks)
        except BaseException as caught:
            exc = self._first_chunk_error(route, caught, timeout_s, by_caller)
            try:
                await close_chunks(chunks)
            finally:
                _attempt_failed(info, span, permit, exc)
            if exc is caught:
                raise
            raise exc from None
        if not info.flowing:  # the call's first chunk; not a recovery's
            info.flowing = True
            info.observer.first_chunk()
        return OpenStream(route, chunks, first, permit, admission, span)


def may_have_executed(exc: BaseException, attempts: int) -> bool:
    """Whether a call that failed with `exc` after `attempts` upstream attempts may still
    have had its effect: an attempt was sent and no answer says what happened (a timeout,
    a reset connection, an unreadable answer, a cancellation). A policy's refusal sent
    nothing; an upstream that answered with an error status said what happened."""
    if attempts == 0 or isinstance(exc, errors.PolicyError):
        return False
    return not (isinstance(exc, errors.UpstreamError) and exc.http_status)


REFUSAL_EVENTS: dict[type[BaseException], str] = {
    errors.RateLimitedError: "rate_limit.rejected",
    errors.OverloadedError: "bulkhead.rejected",
}
WAIT_EVENT_MIN_S = 0.0005  # shorter waits are not worth an event


def _waited(observer: CallObserver, route: Route, event: str, seconds: float) -> None:
    if seconds >= WAIT_EVENT_MIN_S:
        observer.event(event, route.name, delay_s=seconds)


def _attempt_failed(trace: CallTrace, span: Any, permit: Permit | None, exc: BaseException) -> None:
    if permit is not None:
        permit.release(outcome_of(exc))
    trace.observer.attempt_end(span, None, exc)


def _silent(exc: errors.UpstreamError) -> bool:
    """A timeout of the upstream's own (not the caller's deadline): it kept silent."""
    return isinstance(exc, errors.UpstreamTimeoutError) and not exc.caller_deadline


def _set_attempts(exc: errors.SidecarError, attempts: int) -> None:
    """Carry the upstream attempts made on the error, whatever its kind (0: leave it)."""
    if attempts > 0:
        exc.attempts = attempts
