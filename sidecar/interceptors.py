"""Cross-cutting checks on every RPC: bearer-token auth and refusal while draining.

They run before a handler starts, so a refused call never reaches an upstream. Refusals
carry the same rich status as every other error (`sidecar.status`).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from sidecar import errors, status

SIDECAR_PREFIX = "/tether.v1.Sidecar/"
# Always answered, even while draining: operators need to see the state.
DRAIN_EXEMPT = frozenset({"/tether.v1.Sidecar/GetStatus"})

if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[Handler]]


def _rejecting(handler: Handler, exc: errors.SidecarError) -> Handler:
    """A handler of the same shape as `handler` that ends the RPC with `exc`'s status."""
    code, message, rich = status.to_rich_status(exc)
    trailer = status.trailing_metadata(rich)

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message, trailing_metadata=trailer)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message, trailing_metadata=trailer)
        yield  # pragma: no cover - makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks `authorization: Bearer <token>` (when configured) and the drain flag."""

    def __init__(self, token: str | None) -> None:
        self._expected = f"Bearer {token}".encode() if token else None
        self.draining = False

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        if self._expected is None:
            return True
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value if isinstance(value, bytes) else value.encode()
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: gRPC answers UNIMPLEMENTED itself
            return handler
        method = handler_call_details.method
        if not self._authorized(handler_call_details) and not method.startswith("/grpc.health"):
            return _rejecting(handler, errors.UnauthenticatedError("missing or wrong bearer token"))
        if self.draining and method.startswith(SIDECAR_PREFIX) and method not in DRAIN_EXEMPT:
            return _rejecting(handler, errors.DrainingError("the sidecar is shutting down"))
        return handler
