"""The gRPC servicer: proto messages in, upstream calls out, errors through `sidecar.status`.

Handlers stay thin: admission (`_prepare`) turns a request into an `UpstreamRequest` for a
known upstream, the call runs under the tighter of the upstream's timeout and the caller's
gRPC deadline, and every failure leaves through `abort`, the one place errors become statuses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import orjson

from sidecar import errors, status
from sidecar.config import Config
from sidecar.upstreams.base import Upstream, UpstreamRequest, Usage
from tether.v1 import sidecar_pb2 as pb
from tether.v1 import sidecar_pb2_grpc as pb_grpc

log = logging.getLogger("tether.sidecar")

KIND_TO_PB = {"model": pb.CALL_KIND_MODEL, "tool": pb.CALL_KIND_TOOL}
PB_TO_KIND = {pb.CALL_KIND_MODEL: "model", pb.CALL_KIND_TOOL: "tool"}
DEFAULT_OPERATION = {"model": "chat", "tool": ""}
_EMPTY_USAGE = pb.Usage()


class UpstreamSlot:
    """An upstream adapter and the counters the sidecar keeps for it."""

    __slots__ = ("calls", "errors", "in_flight", "upstream")

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.in_flight = 0
        self.calls = 0
        self.errors = 0

    def to_pb(self) -> pb.UpstreamStatus:
        up = self.upstream
        return pb.UpstreamStatus(
            name=up.name,
            kind=KIND_TO_PB[up.kind],
            type=up.type,
            breaker_state="disabled",
            in_flight=self.in_flight,
            calls=self.calls,
            errors=self.errors,
            hits=up.stats().get("hits", 0),
        )


def _usage_pb(usage: Usage | None) -> pb.Usage:
    if usage is None:
        return _EMPTY_USAGE
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
    )


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End the RPC with the status `sidecar.status` assigns to `exc`."""
    code, message, rich = status.to_rich_status(exc)
    await context.abort(code, message, trailing_metadata=status.trailing_metadata(rich))
    raise AssertionError("context.abort returned")  # pragma: no cover


class SidecarService(pb_grpc.SidecarServicer):  # type: ignore[misc]
    """Implements tether.v1.Sidecar over a set of upstream adapters."""

    def __init__(self, config: Config, upstreams: dict[str, Upstream]) -> None:
        self.config = config
        self.slots = {name: UpstreamSlot(up) for name, up in upstreams.items()}
        self.max_payload_bytes = config.limits.max_payload_bytes
        self.config_version = config.version()
        self.started = time.monotonic()
        self.serving = True

    @property
    def in_flight(self) -> int:
        return sum(slot.in_flight for slot in self.slots.values())

    def _prepare(self, request: pb.CallRequest) -> tuple[UpstreamSlot, UpstreamRequest]:
        slot = self.slots.get(request.upstream)
        if slot is None:
            if not request.upstream:
                raise errors.InvalidRequestError("upstream is required", field="upstream")
            raise errors.UnknownUpstreamError(request.upstream, list(self.slots))
        upstream = slot.upstream
        if request.kind and PB_TO_KIND.get(request.kind) != upstream.kind:
            raise errors.InvalidRequestError(
                f"upstream {upstream.name!r} is a {upstream.kind} upstream; the call says "
                f"{pb.CallKind.Name(request.kind)}",
                field="kind",
            )
        size = len(request.payload)
        if size > self.max_payload_bytes:
            raise errors.PayloadTooLargeError(size, self.max_payload_bytes)
        try:
            body = orjson.loads(request.payload)
        except orjson.JSONDecodeError as exc:
            raise errors.InvalidRequestError(
                f"payload is not JSON: {exc}", field="payload"
            ) from None
        operation = request.operation or DEFAULT_OPERATION[upstream.kind]
        call = UpstreamRequest(
            operation, request.payload, body, request.idempotency_key, request.run_id
        )
        upstream.validate(call)
        return slot, call

    def _timeout_s(self, upstream: Upstream, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        remaining = context.time_remaining()
        return upstream.timeout_s if remaining is None else min(upstream.timeout_s, remaining)

    def _timed_out(self, upstream: Upstream, timeout_s: float) -> errors.UpstreamTimeoutError:
        return errors.UpstreamTimeoutError(
            f"upstream {upstream.name!r} did not answer within {timeout_s:.3f} s",
            upstream=upstream.name,
        )

    async def Call(
        self, request: pb.CallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.CallResponse:
        slot: UpstreamSlot | None = None
        try:
            slot, call = self._prepare(request)
            slot.calls += 1
            slot.in_flight += 1
            upstream = slot.upstream
            timeout_s = self._timeout_s(upstream, context)
            try:
                async with asyncio.timeout(timeout_s):
                    answer = await upstream.call(call)
            except TimeoutError:
                raise self._timed_out(upstream, timeout_s) from None
            finally:
                slot.in_flight -= 1
        except Exception as exc:
            await self._fail(context, slot, exc)
        return pb.CallResponse(
            payload=answer.payload,
            attempts=1,
            usage=_usage_pb(answer.usage),
            upstream_status=answer.status,
            upstream=upstream.name,
            idempotency_key=request.idempotency_key,
        )

    async def _fail(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        slot: UpstreamSlot | None,
        exc: Exception,
    ) -> NoReturn:
        if slot is not None:
            slot.errors += 1
        if isinstance(exc, errors.SidecarError):
            log.info("call failed: %s: %s", type(exc).__name__, exc.message)
        else:
            log.exception("internal error while serving a call")
        await abort(context, exc)

    async def StreamCall(
        self, request: pb.CallRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamChunk]:
        slot: UpstreamSlot | None = None
        try:
            slot, call = self._prepare(request)
            upstream = slot.upstream
            if not upstream.supports_stream:
                raise errors.InvalidRequestError(
                    f"upstream {upstream.name!r} does not stream; use Call", field="upstream"
                )
            slot.calls += 1
            slot.in_flight += 1
            try:
                usage = None
                index = 0
                async for chunk in self._stream(upstream, call, context):
                    yield pb.StreamChunk(data=chunk.data, index=index)
                    index += 1
                    usage = chunk.usage or usage
            finally:
                slot.in_flight -= 1
        except Exception as exc:
            await self._fail(context, slot, exc)
        yield pb.StreamChunk(
            final=True,
            index=index,
            attempts=1,
            usage=_usage_pb(usage),
            upstream_status=200,
            upstream=upstream.name,
        )

    async def _stream(
        self,
        upstream: Upstream,
        call: UpstreamRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Any]:
        """The upstream's chunks, the whole stream bounded by one timeout (not the yields)."""
        timeout_s = self._timeout_s(upstream, context)
        deadline = asyncio.get_running_loop().time() + timeout_s
        chunks = upstream.stream(call)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    raise self._timed_out(upstream, timeout_s) from None
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    async def GetStatus(
        self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetStatusResponse:
        from sidecar import __version__

        return pb.GetStatusResponse(
            version=__version__,
            config_version=self.config_version,
            serving=self.serving,
            uptime_s=time.monotonic() - self.started,
            upstreams=[slot.to_pb() for slot in self.slots.values()],
            in_flight=self.in_flight,
        )

    async def _not_yet(self, context: grpc.aio.ServicerContext[Any, Any], what: str) -> NoReturn:
        await abort(
            context,
            errors.NotSupportedError(f"{what} needs the journal, which this build lacks"),
        )

    async def BeginCall(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._not_yet(context, "BeginCall (guarded mode)")

    async def EndCall(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._not_yet(context, "EndCall (guarded mode)")

    async def SaveCheckpoint(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await self._not_yet(context, "SaveCheckpoint")

    async def LoadCheckpoint(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await self._not_yet(context, "LoadCheckpoint")

    async def ListRuns(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await self._not_yet(context, "ListRuns")
