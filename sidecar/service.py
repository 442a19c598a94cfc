"""The gRPC servicer: proto messages in, the policy pipeline, errors through `sidecar.status`.

Handlers stay thin: `_prepare` turns a request into an `UpstreamRequest` for a known route,
`sidecar.pipeline` runs it through the route's policies and fallbacks under the caller's
deadline, and every failure leaves through `abort`, the one place errors become statuses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import grpc
import orjson

from sidecar import errors, status
from sidecar.config import Config
from sidecar.guarded import GuardedCalls
from sidecar.journal.base import Completion, State
from sidecar.journal.recorder import Claim, Ident, Recorder, request_hash
from sidecar.journal.rpc import JournalRPCs
from sidecar.journal.wire import (
    completion_of,
    entry_usage,
    frame,
    replayed_response,
    unframe,
    usage_pb,
)
from sidecar.pipeline import Pipeline
from sidecar.policies.clock import SYSTEM_CLOCK, Clock
from sidecar.policies.deadline import tighter
from sidecar.routes import CallResult, CallTrace, Plan, Route, StreamInfo
from sidecar.telemetry.hub import Telemetry
from sidecar.upstreams.base import Upstream, UpstreamRequest
from tether.v1 import sidecar_pb2 as pb
from tether.v1 import sidecar_pb2_grpc as pb_grpc

log = logging.getLogger("tether.sidecar")

KIND_TO_PB = {"model": pb.CALL_KIND_MODEL, "tool": pb.CALL_KIND_TOOL}
PB_TO_KIND: dict[int, str] = {pb.CALL_KIND_MODEL: "model", pb.CALL_KIND_TOOL: "tool"}
# by upstream type, else by kind
DEFAULT_OPERATION = {"anthropic": "messages", "model": "chat", "tool": ""}

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class Proxied:
    """A unary call's answer and the sidecar's own share of its time."""

    response: pb.CallResponse
    overhead_s: float


def route_status(route: Route) -> pb.UpstreamStatus:
    up = route.upstream
    gauges = route.gauges()
    rejected = sum(gauges.get(f"{gate}.rejected", 0.0) for gate in ("rate_limit", "bulkhead"))
    rejected += gauges.get("breaker.rejected", 0.0)
    return pb.UpstreamStatus(
        name=route.name,
        kind=KIND_TO_PB[up.kind],
        type=up.type,
        breaker_state=route.breaker.state if route.breaker else "disabled",
        in_flight=route.in_flight,
        calls=route.calls,
        errors=route.errors,
        hits=up.stats().get("hits", 0),
        gauges=gauges,
        queued=route.bulkhead.queued if route.bulkhead else 0,
        retries=route.retrier.retries if route.retrier else 0,
        fallbacks=route.fallbacks_used,
        rejected=int(rejected),
    )


async def abort(context: Context, exc: BaseException) -> NoReturn:
    """End the RPC with the status `sidecar.status` assigns to `exc`."""
    code, message, rich = status.to_rich_status(exc)
    await context.abort(code, message, trailing_metadata=status.trailing_metadata(rich))
    raise AssertionError("context.abort returned")  # pragma: no cover


def parse_kind(request_kind: int, upstream: Upstream) -> None:
    """InvalidRequestError when the call's kind is set and is not the upstream's."""
    if not request_kind or PB_TO_KIND.get(request_kind) == upstream.kind:
        return
    said = PB_TO_KIND.get(request_kind, f"unknown kind {request_kind}")
    raise errors.InvalidRequestError(
        f"upstream {upstream.name!r} is a {upstream.kind} upstream; the call says {said}",
        field="kind",
    )


def check_run_key(request: pb.CallRequest | pb.BeginCallRequest) -> None:
    """InvalidRequestError for a call with a run id but no key: it could not be journaled,
    and silently running it unjournaled would break the run's replay."""
    if request.run_id and not request.idempotency_key:
        raise errors.InvalidRequestError(
            f"a call of run {request.run_id!r} needs an idempotency_key to be journaled; use "
            f"client.run({request.run_id!r}), which derives one per step, or pass "
            "idempotency_key",
            field="idempotency_key",
        )


class SidecarService(JournalRPCs, pb_grpc.SidecarServicer):  # type: ignore[misc]
    """Implements tether.v1.Sidecar over upstream adapters, their policies and the journal."""

    def __init__(
        self,
        config: Config,
        upstreams: dict[str, Upstream],
        clock: Clock = SYSTEM_CLOCK,
        recorder: Recorder | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.config = config
        self.pipeline = Pipeline(config, upstreams, clock)
        self.routes = self.pipeline.routes
        self.recorder = recorder
        self.telemetry = telemetry or Telemetry(config)
        self.telemetry.watch(self.routes)
        self.guarded = GuardedCalls(self.pipeline, recorder, self.telemetry)
        self.max_payload_bytes = config.limits.max_payload_bytes
        self.config_version = config.version()
        self.started = time.monotonic()
        self.serving = True

    @property
    def in_flight(self) -> int:
        return sum(route.in_flight for route in self.routes.values())

    def route(self, name: str) -> Route:
        route = self.routes.get(name)
        if route is not None:
            return route
        if not name:
            raise errors.InvalidRequestError("upstream is required", field="upstream")
        raise errors.UnknownUpstreamError(name, list(self.routes))

    def _check_size(self, payload: bytes) -> None:
        if len(payload) > self.max_payload_bytes:
            raise errors.PayloadTooLargeError(len(payload), self.max_payload_bytes)

    def _prepare(
        self, request: pb.CallRequest, rpc: str, metadata: Any, stream: bool, body: Any = None
    ) -> tuple[Route, UpstreamRequest, Any]:
        """The route, the upstream request and its telemetry; a refusal here is recorded
        (metrics, span, log) against the upstream when the upstream is known. `body`: the
        payload already parsed (the HTTP front parses it to route it), else it is parsed here."""
        started = time.perf_counter()
        check_run_key(request)
        route = self.route(request.upstream)
        upstream = route.upstream
        operation = (
            request.operation
            or DEFAULT_OPERATION.get(upstream.type)
            or DEFAULT_OPERATION[upstream.kind]
        )
        labels = dict(request.labels) if request.labels else {}
        call = UpstreamRequest(operation, request.payload, None, request.idempotency_key,
                               request.run_id, labels)  # fmt: skip
        try:
            parse_kind(request.kind, upstream)
            self._check_size(request.payload)
            call.body = self._parse(request.payload) if body is None else body
            upstream.validate(call)
        except errors.SidecarError as exc:
            refused = self._observe(route, call, rpc, metadata, stream, started)
            refused.finish(answered_by="", usage=None, exc=exc)
            raise
        return route, call, self._observe(route, call, rpc, metadata, stream, started)

    @staticmethod
    def _parse(payload: bytes) -> Any:
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise errors.InvalidRequestError(
                f"payload is not JSON: {exc}", field="payload"
            ) from None

    async def _fail(self, context: Context, exc: Exception) -> NoReturn:
        if isinstance(exc, errors.SidecarError):
            log.info("call failed: %s: %s", type(exc).__name__, exc.message)
        else:
            log.exception("internal error while serving a call")
        await abort(context, exc)

    def _ident(self, request: pb.CallRequest, route: Route, operation: str, stream: bool) -> Ident:
        digest = request_hash(route.name, operation, stream, request.payload)
        return Ident(request.run_id, request.idempotency_key, route.name, operation, stream, digest)

    def _journaled(self, request: pb.CallRequest) -> bool:
        return self.recorder is not None and bool(request.run_id and request.idempotency_key)

    def _observe(
        self,
        route: Route,
        call: UpstreamRequest,
        rpc: str,
        metadata: Any,
        stream: bool,
        started: float,
    ) -> Any:
        return self.telemetry.call(
            route, call, rpc=rpc, stream=stream, metadata=metadata, started=started
        )

    async def Call(self, request: pb.CallRequest, context: Context) -> pb.CallResponse:
        metadata, timeout_s = context.invocation_metadata(), context.time_remaining()
        try:
            return (await self.proxy(request, "Call", metadata, timeout_s)).response
        except Exception as exc:
            await self._fail(context, exc)

    async def proxy(
        self,
        request: pb.CallRequest,
        rpc: str,
        metadata: Any,
        timeout_s: float | None,
        plan: Plan | None = None,
        body: Any = None,
    ) -> Proxied:
        """One unary call, whichever front it came through: prepare, journal, pipeline and
        telemetry; raises the call's SidecarError. `metadata` (pairs or a mapping of request
        headers) may carry `traceparent`; `rpc` names the call in spans and metrics; `plan`
        (the HTTP front's route of a model) replaces the upstream's own fallbacks; `body` is
        the payload already parsed, if it was."""
        observed = None
        try:
            route, call, observed = self._prepare(request, rpc, metadata, False, body)
            plan = plan or route.plan
            deadline = self.pipeline.deadline(timeout_s, plan.budget_s)
            if self._journaled(request):
                response = await self._journaled_call(
                    request, route, plan, call, deadline, observed
                )
                return Proxied(response, self._overhead_s(observed))
            trace = CallTrace(observer=observed)
            result = await self.pipeline.call(route, call, deadline, trace, plan)
            observed.finish(answered_by=result.upstream, usage=result.response.usage, exc=None)
        except BaseException as exc:
            if observed is not None:
                observed.finish(answered_by="", usage=None, exc=exc)
            raise
        return Proxied(self._response(request, result), self._overhead_s(observed))

    @staticmethod
    def _overhead_s(observed: Any) -> float:
        """The sidecar's own share of the call so far (no upstream time, no backoff)."""
        return float(observed.overhead(time.perf_counter() - observed.started))

    async def _claim(self, ident: Ident, route: Route, plan: Plan, observed: Any) -> Claim:
        assert self.recorder is not None
        try:
            claim = await self.recorder.claim(ident, idempotent=plan.journal_idempotent)
        except errors.OutcomeUnknownError:
            observed.event("journal.in_doubt", route.name)
            raise
        except errors.JournaledError as exc:
            observed.event("journal.replay", route.name)
            observed.finish(answered_by=route.name, usage=None, exc=exc, replayed=True)
            raise
        if claim.entry is not None:
            entry = claim.entry
            observed.event("journal.replay", route.name)
            observed.finish(answered_by=entry.answered_by or route.name,
                            usage=entry_usage(entry), exc=None, replayed=True)  # fmt: skip
        claim.trace.observer = observed
        return claim

    async def _journaled_call(
        self,
        request: pb.CallRequest,
        route: Route,
        plan: Plan,
        call: UpstreamRequest,
        deadline: Any,
        observed: Any,
    ) -> pb.CallResponse:
        ident = self._ident(request, route, call.operation, stream=False)
        claim = await self._claim(ident, route, plan, observed)
        if claim.entry is not None:
            return replayed_response(claim.entry, request.idempotency_key)
        try:
            result = await self.pipeline.call(route, call, deadline, claim.trace, plan)
        except BaseException as exc:
            await asyncio.shield(claim.fail(exc))
            raise
        completion = completion_of(result)
        await claim.settle(completion)  # durable before the answer leaves
        if completion.too_large:
            observed.event("journal.too_large", route.name)
        observed.finish(answered_by=result.upstream, usage=result.response.usage, exc=None)
        return self._response(request, result)

    def _response(self, request: pb.CallRequest, result: CallResult) -> pb.CallResponse:
        answer = result.response
        return pb.CallResponse(
            payload=answer.payload,
            attempts=result.attempts,
            usage=usage_pb(answer.usage),
            upstream_status=answer.status,
            upstream=result.upstream,
            idempotency_key=request.idempotency_key,
        )

    async def StreamCall(
        self, request: pb.CallRequest, context: Context
    ) -> AsyncIterator[pb.StreamChunk]:
        metadata, timeout_s = context.invocation_metadata(), context.time_remaining()
        try:
            proxied = self.proxy_stream(request, "StreamCall", metadata, timeout_s)
            async with aclosing(proxied) as chunks:
                async for message in chunks:
                    yield message
        except Exception as exc:
            await self._fail(context, exc)

    async def proxy_stream(
        self,
        request: pb.CallRequest,
        rpc: str,
        metadata: Any,
        timeout_s: float | None,
        info: StreamInfo | None = None,
        plan: Plan | None = None,
        body: Any = None,
        open_timeout_s: float | None = None,
    ) -> AsyncGenerator[pb.StreamChunk, None]:
        """The streaming `proxy`: the chunks, then a final chunk; raises the call's error.
        `info` (when given) shows the answering upstream and attempts as the stream runs.
        `timeout_s` bounds the whole stream; the plan's budget, and `open_timeout_s` (a
        caller's read timeout), bound getting it flowing: the first chunk."""
        info = StreamInfo() if info is None else info
        index = 0
        claim: Claim | None = None
        observed = None
        try:
            route, call, observed = self._prepare(request, rpc, metadata, True, body)
            if not route.upstream.supports_stream:
                raise errors.InvalidRequestError(
                    f"upstream {route.name!r} does not stream; use Call", field="upstream"
                )
            info.observer = observed
            plan = plan or route.plan
            deadline = self.pipeline.deadline(timeout_s)
            if open_timeout_s is not None:  # bounds the first chunk, and each recovery's
                plan = replace(plan, budget_s=tighter(open_timeout_s, plan.budget_s))
            opening = self.pipeline.deadline(timeout_s, plan.budget_s)
            if self._journaled(request):
                ident = self._ident(request, route, call.operation, stream=True)
                claim = await self._claim(ident, route, plan, observed)
            if claim is not None and claim.entry is not None:
                async for message in self._replay_stream(claim):
                    yield message
                return
            if claim is not None:
                claim.trace = info  # the stream's attempts decide whether it is in doubt
                info.observer = observed
            kept: list[bytes] | None = [] if claim is not None else None
            # aclosing: a cancelled caller releases the permits now, not when GC gets to it
            chunks = self.pipeline.stream(route, call, deadline, info, plan, opening)
            async with aclosing(chunks):
                async for chunk in chunks:
                    yield pb.StreamChunk(data=chunk.data, index=index)
                    index += 1
                    if kept is not None:
                        kept.append(chunk.data)
            if claim is not None and kept is not None:
                await claim.settle(self._stream_completion(info, kept))
            observed.finish(answered_by=info.upstream, usage=info.usage, exc=None)
        except BaseException as exc:
            if claim is not None and claim.entry is None:
                await asyncio.shield(claim.fail(exc))
            if observed is not None:
                observed.finish(answered_by=info.upstream, usage=None, exc=exc)
            raise
        yield pb.StreamChunk(
            final=True,
            index=index,
            attempts=info.attempts,
            usage=usage_pb(info.usage),
            upstream_status=200,
            upstream=info.upstream,
        )

    def _stream_completion(self, info: StreamInfo, kept: list[bytes]) -> Completion:
        usage = info.usage
        return Completion(
            State.DONE,
            answered_by=info.upstream,
            upstream_status=200,
            attempts=info.attempts,
            input_tokens=usage.input_tokens if usage else 0,
            output_tokens=usage.output_tokens if usage else 0,
            payload=frame(kept),
        )

    async def _replay_stream(self, claim: Claim) -> AsyncIterator[pb.StreamChunk]:
        entry = claim.entry
        assert entry is not None
        index = 0
        for data in unframe(entry.payload or b""):
            yield pb.StreamChunk(data=data, index=index, replayed=True)
            index += 1
        yield pb.StreamChunk(
            final=True, index=index, replayed=True, attempts=0,
            usage=usage_pb(entry_usage(entry)), upstream_status=entry.upstream_status,
            upstream=entry.answered_by or entry.upstream,
        )  # fmt: skip

    async def BeginCall(
        self, request: pb.BeginCallRequest, context: Context
    ) -> pb.BeginCallResponse:
        try:
            check_run_key(request)
            route = self.route(request.upstream)
            parse_kind(request.kind, route.upstream)
            self._check_size(request.payload)
            deadline = self.pipeline.deadline(context.time_remaining())
            return await self.guarded.begin(route, request, deadline, context.invocation_metadata())
        except Exception as exc:
            await self._fail(context, exc)

    async def EndCall(self, request: pb.EndCallRequest, context: Context) -> pb.EndCallResponse:
        try:
            await self.guarded.end(request)
        except Exception as exc:
            await self._fail(context, exc)
        return pb.EndCallResponse()

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: Context
    ) -> pb.GetStatusResponse:
        from sidecar import __version__

        return pb.GetStatusResponse(
            version=__version__,
            config_version=self.config_version,
            serving=self.serving,
            uptime_s=time.monotonic() - self.started,
            upstreams=[route_status(route) for route in self.routes.values()],
            in_flight=self.in_flight,
            journal=self._journal_status(),
        )

    def _journal_status(self) -> pb.JournalStatus:
        recorder = self.recorder
        if recorder is None:
            return pb.JournalStatus(enabled=False, backend="none")
        store = recorder.store
        return pb.JournalStatus(
            enabled=True,
            backend=self.config.journal.backend,
            replays=recorder.replays,
            in_doubt=recorder.in_doubt,
            too_large=recorder.too_large,
            joined=recorder.joined,
            commits=getattr(store, "commits", 0),
            writes=getattr(store, "ops", 0),
        )

    async def SaveCheckpoint(
        self, request: pb.SaveCheckpointRequest, context: Context
    ) -> pb.SaveCheckpointResponse:
        try:
            return await self._save(request)
        except Exception as exc:
            await self._fail(context, exc)

    async def LoadCheckpoint(
        self, request: pb.LoadCheckpointRequest, context: Context
    ) -> pb.LoadCheckpointResponse:
        try:
            return await self._load(request)
        except Exception as exc:
            await self._fail(context, exc)

    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        try:
            return await self._list(request)
        except Exception as exc:
            await self._fail(context, exc)

    async def GetRun(self, request: pb.GetRunRequest, context: Context) -> pb.GetRunResponse:
        try:
            return await self._get_run(request)
        except Exception as exc:
            await self._fail(context, exc)

    async def ResolveCall(
        self, request: pb.ResolveCallRequest, context: Context
    ) -> pb.ResolveCallResponse:
        try:
            return await self._resolve(request)
        except Exception as exc:
            await self._fail(context, exc)
