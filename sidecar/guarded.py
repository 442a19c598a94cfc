"""Guarded calls: the agent executes the call itself; the sidecar admits it and learns its outcome.

`begin` runs the same gates as a proxied call (rate limit, bulkhead, breaker) and hands out
a `call_id`; `end` reports the outcome to them. A call whose `end` never comes (the agent
died) is released as neutral when its lease, the upstream's per-attempt timeout, runs out,
so a crashed agent cannot hold bulkhead slots or half-open probes forever.
"""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass

import orjson

from sidecar import errors
from sidecar.pipeline import Admission, Pipeline, Route
from sidecar.policies.base import NEUTRAL, UPSTREAM_SIDE_4XX, Outcome, Permit, Verdict
from sidecar.policies.deadline import Deadline
from sidecar.upstreams.base import UpstreamRequest, Usage
from tether.v1 import sidecar_pb2 as pb


@dataclass(slots=True)
class _Guarded:
    route: Route
    admission: Admission
    permit: Permit | None
    lease: asyncio.TimerHandle | None = None

    def release(self, outcome: Outcome) -> None:
        if self.lease is not None:
            self.lease.cancel()
        if self.permit is not None:
            self.permit.release(outcome)
        self.admission.release(outcome)
        self.route.in_flight -= 1


def outcome_of_end(request: pb.EndCallRequest) -> Outcome:
    """How the agent's reported outcome counts: transient errors are upstream failures."""
    usage = None
    if request.HasField("usage"):
        u = request.usage
        usage = Usage(u.input_tokens, u.output_tokens)
    if request.WhichOneof("outcome") != "error":
        return Outcome(Verdict.SUCCESS, usage=usage)
    error = request.error
    failed = error.retryable or error.status >= 500 or error.status in UPSTREAM_SIDE_4XX
    return Outcome(Verdict.FAILURE if failed else Verdict.SUCCESS, usage=usage)


class GuardedCalls:
    """Guarded calls in progress, by call id."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline
        self._calls: dict[str, _Guarded] = {}

    def __len__(self) -> int:
        return len(self._calls)

    async def begin(self, route: Route, request: pb.BeginCallRequest, deadline: Deadline) -> str:
        """Admit the call through the route's gates; returns its call id."""
        try:
            body = orjson.loads(request.payload) if request.payload else None
        except orjson.JSONDecodeError:
            body = None  # guarded payloads need not be JSON; only token estimates use it
        call = UpstreamRequest(
            request.operation, request.payload, body, request.idempotency_key, request.run_id
        )
        admission = await self._pipeline.admit(route, call, deadline)
        try:
            permit = route.breaker.admit() if route.breaker is not None else None
        except BaseException:
            admission.release(NEUTRAL)
            route.errors += 1
            raise
        call_id = secrets.token_hex(12)
        guarded = _Guarded(route, admission, permit)
        loop = asyncio.get_running_loop()
        guarded.lease = loop.call_later(route.attempt_timeout_s, self._expire, call_id)
        route.in_flight += 1
        self._calls[call_id] = guarded
        return call_id

    def end(self, request: pb.EndCallRequest) -> None:
        """Report the outcome of a begun call to its gates."""
        guarded = self._calls.pop(request.call_id, None)
        if guarded is None:
            raise errors.InvalidRequestError(
                f"no guarded call {request.call_id!r} in progress (unknown, ended, or its "
                "lease ran out)",
                field="call_id",
            )
        outcome = outcome_of_end(request)
        if request.WhichOneof("outcome") == "error":
            guarded.route.errors += 1
        guarded.release(outcome)

    def _expire(self, call_id: str) -> None:
        guarded = self._calls.pop(call_id, None)
        if guarded is not None:
            guarded.lease = None
            guarded.release(NEUTRAL)
