"""Guarded calls: the agent executes the call itself; the sidecar admits it and learns its outcome.

`begin` first asks the journal (a completed call of the run is answered from it, replayed),
then runs the same gates as a proxied call (rate limit, bulkhead, breaker) and hands out a
`call_id`; `end` reports the outcome to the gates and the journal. A call whose `end` never
comes (the agent died) is released as neutral when its lease, the upstream's per-attempt
timeout, runs out, so a crashed agent cannot hold bulkhead slots or half-open probes forever.

For the journal, an admitted guarded call counts one attempt: from then on the agent may have
executed it. So for a non-idempotent upstream, a call whose end never comes (lease expired),
whose block was cancelled, or that failed transiently without a status (a connection error, a
timeout: the request may have got through) stays in doubt (OUTCOME_UNKNOWN until resolved).
An outcome the agent reported otherwise is known and journaled: a result; an error with a
status or a permanent one, FAILED (replayed as it is unless retryable, like a proxied call).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from sidecar import errors
from sidecar.journal.base import Completion, Entry, State, StoredError
from sidecar.journal.recorder import Claim, Ident, Recorder, request_hash
from sidecar.pipeline import Pipeline
from sidecar.policies.base import (
    NEUTRAL,
    UPSTREAM_SIDE_4XX,
    Outcome,
    Permit,
    Verdict,
    outcome_of,
    succeeded,
)
from sidecar.policies.deadline import Deadline
from sidecar.routes import Admission, Route
from sidecar.telemetry.calls import NULL_OBSERVER
from sidecar.upstreams.base import UpstreamRequest, Usage
from tether.v1 import sidecar_pb2 as pb


@dataclass(slots=True)
class _Guarded:
    route: Route
    admission: Admission
    permit: Permit | None
    claim: Claim | None = None
    lease: asyncio.TimerHandle | None = None
    observed: Any = None  # the call's telemetry, finished at EndCall or when the lease ends
    admitted_at: float = 0.0  # from here to EndCall the agent runs the call: not our overhead

    def release(self, outcome: Outcome) -> None:
        if self.lease is not None:
            self.lease.cancel()
        if self.permit is not None:
            self.permit.release(outcome)
        self.admission.release(outcome)
        self.route.in_flight -= 1


# How the SDK reports a guarded block that was cancelled (CancelledError, KeyboardInterrupt...):
# the nginx "client closed request" status, with its own type.
CANCELLED_TYPE = "cancelled"
CANCELLED_STATUS = 499


class GuardedCallError(Exception):
    """The error a guarded call reported, as its outcome's `error` (it refunds tokens the
    call did not report using, like a failed proxied call)."""


def outcome_of_end(request: pb.EndCallRequest) -> Outcome:
    """How the agent's reported outcome counts: transient errors are upstream failures, a
    cancelled block is neutral, any other error means the dependency answered."""
    usage = None
    if request.HasField("usage"):
        u = request.usage
        usage = Usage(u.input_tokens, u.output_tokens)
    if request.WhichOneof("outcome") != "error":
        return succeeded(usage)
    error = request.error
    failure = GuardedCallError(f"{error.type or 'error'}: {error.message}")
    if error.type == CANCELLED_TYPE or error.status == CANCELLED_STATUS:
        return Outcome(Verdict.NEUTRAL, failure, usage)
    return Outcome(Verdict.FAILURE if transient_error(error) else Verdict.SUCCESS, failure, usage)


def transient_error(error: pb.CallError) -> bool:
    """A failure of the dependency (counted against it, and run again on replay), as for
    proxied calls: reported retryable, or a 5xx, 408 or 429 status."""
    return error.retryable or error.status >= 500 or error.status in UPSTREAM_SIDE_4XX


def replayed_begin(entry: Entry, key: str) -> pb.BeginCallResponse:
    usage = pb.Usage(input_tokens=entry.input_tokens, output_tokens=entry.output_tokens,
                     total_tokens=entry.input_tokens + entry.output_tokens)  # fmt: skip
    return pb.BeginCallResponse(
        replayed=True, payload=entry.payload or b"", usage=usage, idempotency_key=key
    )


def replayed_error(error: errors.JournaledError, key: str) -> pb.BeginCallResponse:
    meta = error.metadata()
    status = int(meta.get("status", "0") or 0)
    failure = pb.CallError(type=error.reason, message=error.message, status=status)
    return pb.BeginCallResponse(replayed=True, error=failure, idempotency_key=key)


def completion_of_end(request: pb.EndCallRequest, claim: Claim) -> Completion:
    usage = request.usage
    if request.WhichOneof("outcome") != "error":
        return Completion(
            State.DONE,
            answered_by=claim.ident.upstream,
            payload=request.payload,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )
    e = request.error
    stored = StoredError("UNKNOWN", e.type or "error", e.message, {"status": str(e.status)},
                         transient_error(e))  # fmt: skip
    return Completion(State.FAILED, answered_by=claim.ident.upstream, error=stored)


def in_doubt(request: pb.EndCallRequest, claim: Claim) -> bool:
    """Whether a reported error leaves a non-idempotent call in doubt: transient and without
    a status (a connection error or timeout in the agent's client may have reached the
    dependency). An error with a status was an answer; a permanent one is replayed as is."""
    if claim.idempotent or request.WhichOneof("outcome") != "error":
        return False
    return request.error.retryable and not request.error.status


class GuardedCalls:
    """Guarded calls in progress, by call id."""

    def __init__(
        self, pipeline: Pipeline, recorder: Recorder | None = None, telemetry: Any = None
    ) -> None:
        self._pipeline = pipeline
        self._recorder = recorder
        self._telemetry = telemetry
        self._calls: dict[str, _Guarded] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._calls)

    def _observe(self, route: Route, request: pb.BeginCallRequest, metadata: Any) -> Any:
        if self._telemetry is None:
            return NULL_OBSERVER
        call = UpstreamRequest(request.operation, request.payload, None,
                               request.idempotency_key, request.run_id)  # fmt: skip
        return self._telemetry.call(route, call, rpc="BeginCall", stream=False,
                                    metadata=metadata, attach=False)  # fmt: skip

    async def begin(
        self,
        route: Route,
        request: pb.BeginCallRequest,
        deadline: Deadline,
        metadata: Any = None,
    ) -> pb.BeginCallResponse:
        """Answer from the journal, or admit the call through the route's gates."""
        observed = self._observe(route, request, metadata)
        try:
            answer = await self._begin(route, request, deadline, observed)
        except BaseException as exc:
            _finish(observed, route, exc=exc)
            raise
        if answer.replayed:
            observed.event("journal.replay", route.name)
            _finish(observed, route, exc=None, replayed=True)
        return answer

    async def _begin(
        self, route: Route, request: pb.BeginCallRequest, deadline: Deadline, observed: Any
    ) -> pb.BeginCallResponse:
        claim = None
        if self._recorder is not None and request.run_id and request.idempotency_key:
            digest = request_hash(route.name, request.operation, False, request.payload)
            ident = Ident(request.run_id, request.idempotency_key, route.name,
                          request.operation, False, digest)  # fmt: skip
            try:
                claim = await self._recorder.claim(ident, idempotent=route.idempotent)
            except errors.JournaledError as error:
                return replayed_error(error, request.idempotency_key)
            if claim.entry is not None:
                return replayed_begin(claim.entry, request.idempotency_key)
        try:
            call_id = await self._admit(route, request, deadline, claim, observed)
        except BaseException as exc:
            if claim is not None:
                await asyncio.shield(claim.fail(exc))
            raise
        return pb.BeginCallResponse(call_id=call_id, idempotency_key=request.idempotency_key)

    async def _admit(
        self,
        route: Route,
        request: pb.BeginCallRequest,
        deadline: Deadline,
        claim: Claim | None,
        observed: Any,
    ) -> str:
        try:
            body = orjson.loads(request.payload) if request.payload else None
        except orjson.JSONDecodeError:
            body = None  # guarded payloads need not be JSON; only token estimates use it
        call = UpstreamRequest(
            request.operation, request.payload, body, request.idempotency_key, request.run_id
        )
        admission = await self._pipeline.admit(route, call, deadline, observed)
        try:
            permit = route.breaker.admit() if route.breaker is not None else None
        except BaseException as exc:
            if isinstance(exc, errors.CircuitOpenError):
                observed.event("breaker.rejected", route.name)
            admission.release(outcome_of(exc))  # neutral, and the token reservation refunded
            route.errors += 1
            raise
        call_id = secrets.token_hex(12)
        guarded = _Guarded(route, admission, permit, claim, observed=observed,
                           admitted_at=time.perf_counter())  # fmt: skip
        loop = asyncio.get_running_loop()
        guarded.lease = loop.call_later(route.attempt_timeout_s, self._expire, call_id)
        route.in_flight += 1
        self._calls[call_id] = guarded
        if claim is not None:
            claim.trace.attempts = 1  # the agent may execute it from now on
        return call_id

    async def end(self, request: pb.EndCallRequest) -> None:
        """Report the outcome of a begun call to its gates and the journal."""
        guarded = self._calls.pop(request.call_id, None)
        if guarded is None:
            raise errors.InvalidRequestError(
                f"no guarded call {request.call_id!r} in progress (unknown, ended, or its "
                "lease ran out)",
                field="call_id",
            )
        outcome = outcome_of_end(request)
        failed = request.WhichOneof("outcome") == "error"
        if failed:
            guarded.route.errors += 1
        guarded.release(outcome)
        usage = Usage(request.usage.input_tokens, request.usage.output_tokens)
        reported = _reported_error(request, outcome, guarded.route) if failed else None
        _finish(guarded.observed, guarded.route, exc=reported, usage=usage,
                executing_since=guarded.admitted_at)  # fmt: skip
        claim = guarded.claim
        if claim is None:
            return
        if outcome.verdict is Verdict.NEUTRAL or in_doubt(request, claim):
            await claim.abandon()  # in doubt, unless the upstream is idempotent
        else:
            await claim.settle(completion_of_end(request, claim))

    def _expire(self, call_id: str) -> None:
        guarded = self._calls.pop(call_id, None)
        if guarded is None:
            return
        guarded.lease = None
        guarded.release(NEUTRAL)
        _finish(guarded.observed, guarded.route, exc=asyncio.CancelledError(),
                executing_since=guarded.admitted_at)  # fmt: skip
        if guarded.claim is not None:
            task = asyncio.ensure_future(guarded.claim.abandon())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _finish(
    observed: Any,
    route: Route,
    *,
    exc: BaseException | None,
    usage: Usage | None = None,
    replayed: bool = False,
    executing_since: float = 0.0,
) -> None:
    if observed is None or observed is NULL_OBSERVER:
        return
    if executing_since:
        observed.add_upstream_time(time.perf_counter() - executing_since)
    observed.finish(answered_by=route.name, usage=usage, exc=exc, replayed=replayed)


def _reported_error(request: pb.EndCallRequest, outcome: Outcome, route: Route) -> BaseException:
    """The agent's reported failure as one of our error classes (bounded metric labels)."""
    if outcome.verdict is Verdict.NEUTRAL:
        return asyncio.CancelledError()
    message = f"the agent reported {request.error.type or 'an error'}: {request.error.message}"
    if outcome.verdict is Verdict.FAILURE:
        return errors.UpstreamUnavailableError(message[:500], upstream=route.name,
                                               http_status=request.error.status)  # fmt: skip
    return errors.UpstreamClientError(message[:500], upstream=route.name,
                                      http_status=request.error.status or 400)  # fmt: skip
