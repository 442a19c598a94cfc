"""Errors the SDK raises, mapped from the sidecar's gRPC statuses in one table.

The tree (the mirror of `sidecar/status.py`, matched by the ErrorInfo `reason`)::

    TetherError
    ├── InvalidRequestError            INVALID_ARGUMENT     INVALID_REQUEST
    ├── UnknownUpstreamError           NOT_FOUND            UNKNOWN_UPSTREAM
    ├── PayloadTooLargeError           RESOURCE_EXHAUSTED   PAYLOAD_TOO_LARGE
    ├── NotFoundError                  NOT_FOUND            NOT_FOUND (run, call, checkpoint)
    ├── UnauthenticatedError           UNAUTHENTICATED      UNAUTHENTICATED
    ├── SidecarUnavailableError        UNAVAILABLE          (sidecar not reachable)
    │   └── DrainingError              UNAVAILABLE          DRAINING
    ├── DeadlineExceededError          DEADLINE_EXCEEDED    (the caller's deadline)
    ├── CallCancelledError             CANCELLED            (the caller cancelled)
    ├── NotSupportedError              UNIMPLEMENTED        NOT_IMPLEMENTED
    ├── PolicyError                    the sidecar refused; the upstream was not called
    │   ├── CircuitOpenError           UNAVAILABLE          CIRCUIT_OPEN
    │   ├── RateLimitedError           RESOURCE_EXHAUSTED   RATE_LIMITED
    │   ├── OverloadedError            RESOURCE_EXHAUSTED   OVERLOADED
    │   └── StateUnavailableError      UNAVAILABLE          STATE_UNAVAILABLE
    ├── UpstreamError                  the upstream was called and failed
    │   ├── UpstreamTimeoutError       DEADLINE_EXCEEDED    UPSTREAM_TIMEOUT
    │   ├── UpstreamUnavailableError   UNAVAILABLE          UPSTREAM_UNAVAILABLE
    │   ├── UpstreamBadResponseError   UNAVAILABLE          UPSTREAM_BAD_RESPONSE
    │   ├── UpstreamResponseTooLargeError RESOURCE_EXHAUSTED UPSTREAM_TOO_LARGE
    │   ├── UpstreamClientError        by HTTP status       UPSTREAM_CLIENT_ERROR
    │   └── ReplayedToolError          (SDK only) a `@tool`'s journaled failure, replayed
    ├── JournalError
    │   ├── NonDeterministicReplayError FAILED_PRECONDITION NON_DETERMINISTIC_REPLAY
    │   ├── OutcomeUnknownError        ABORTED              OUTCOME_UNKNOWN
    │   └── JournalUnavailableError    UNAVAILABLE          JOURNAL_UNAVAILABLE
    └── InternalError                  INTERNAL, or any status not listed here

Every error keeps the gRPC `code`, the `reason`, the ErrorInfo `metadata`, and
`retry_after_s` when the sidecar sent a RetryInfo. An error replayed from the journal is the
same class as the original, with `metadata["replayed"] == "true"`. `UpstreamTimeoutError` is also a
`DeadlineExceededError`, so one `except` catches every timeout.
"""

from __future__ import annotations

from typing import Any, Final

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY: Final = "grpc-status-details-bin"


class TetherError(Exception):
    """Base of every error the SDK raises."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode = grpc.StatusCode.UNKNOWN,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata = dict(metadata or {})
        self.retry_after_s = retry_after_s

    @property
    def upstream(self) -> str | None:
        """The upstream the error concerns, when there is one."""
        return self.metadata.get("upstream")

    @property
    def http_status(self) -> int:
        """The upstream's HTTP status, or 0."""
        return int(self.metadata.get("http_status", "0"))

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.message!r}, code={self.code.name}, reason={self.reason!r})"


class InvalidRequestError(TetherError):
    """The request cannot be served as sent (`metadata['field']` names the field)."""


class UnknownUpstreamError(TetherError):
    """No upstream of that name is configured in the sidecar."""


class PayloadTooLargeError(TetherError):
    """The payload is over the sidecar's `limits.max_payload_bytes`."""


class NotFoundError(TetherError):
    """No such run, call or checkpoint in the sidecar's journal."""


class UnauthenticatedError(TetherError):
    """The sidecar wants a bearer token (`token=` or $TETHER_TOKEN) and got none or a wrong one."""


class SidecarUnavailableError(TetherError):
    """The sidecar could not be reached."""


class DrainingError(SidecarUnavailableError):
    """The sidecar is shutting down and takes no new calls."""


class DeadlineExceededError(TetherError):
    """The call did not finish within its deadline."""


class CallCancelledError(TetherError):
    """The call was cancelled by its caller (e.g. a stream closed before its end)."""


class NotSupportedError(TetherError):
    """The sidecar does not offer this RPC in its current build or configuration."""


class PolicyError(TetherError):
    """The sidecar's policies refused the call; the upstream was not called."""


class CircuitOpenError(PolicyError):
    """The upstream's circuit breaker is open; retry after `retry_after_s`."""


class RateLimitedError(PolicyError):
    """The upstream's rate limit refused the call; retry after `retry_after_s`."""


class OverloadedError(PolicyError):
    """Too many calls in flight or queued for the upstream."""


class StateUnavailableError(PolicyError):
    """The shared state store of a `fail_closed` policy is down; retry after
    `retry_after_s`. `metadata` names the `store` and the `policy`."""


class UpstreamError(TetherError):
    """The upstream was called and failed."""


class UpstreamTimeoutError(UpstreamError, DeadlineExceededError):
    """The upstream did not answer within its timeout or the call's deadline."""


class UpstreamUnavailableError(UpstreamError):
    """The upstream answered 5xx, refused the connection or reset it."""


class UpstreamBadResponseError(UpstreamError):
    """The upstream answered something its protocol does not allow."""


class UpstreamResponseTooLargeError(UpstreamError):
    """The upstream's answer is over the sidecar's `limits.max_response_bytes`."""


class UpstreamClientError(UpstreamError):
    """The upstream refused the request with a 4xx (`http_status`); `body` is its reason."""

    @property
    def body(self) -> str:
        return self.metadata.get("upstream_body", "")


class ReplayedToolError(UpstreamError):
    """A `@tether.tool` failed in an earlier execution of this run, and the journal replays
    that failure instead of running the tool again. `error_type` names the original exception
    class (e.g. "ValueError"); `metadata["replayed"] == "true"`."""

    @property
    def error_type(self) -> str:
        return self.metadata.get("error_type", "")


class JournalError(TetherError):
    """The journal cannot answer the call as asked."""


class NonDeterministicReplayError(JournalError):
    """The same idempotency key came back with a different request."""


class OutcomeUnknownError(JournalError):
    """The call was started before a crash and may or may not have happened."""


class JournalUnavailableError(JournalError):
    """The sidecar's journal cannot be written; the call was refused, not run unjournaled."""


class InternalError(TetherError):
    """The sidecar failed in a way it did not expect (a bug: please report it)."""


# The mirror of sidecar.status.TABLE, keyed by ErrorInfo.reason.
BY_REASON: Final[dict[str, type[TetherError]]] = {
    "INVALID_REQUEST": InvalidRequestError,
    "UNKNOWN_UPSTREAM": UnknownUpstreamError,
    "PAYLOAD_TOO_LARGE": PayloadTooLargeError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "NOT_FOUND": NotFoundError,
    "DRAINING": DrainingError,
    "NOT_IMPLEMENTED": NotSupportedError,
    "CIRCUIT_OPEN": CircuitOpenError,
    "RATE_LIMITED": RateLimitedError,
    "OVERLOADED": OverloadedError,
    "STATE_UNAVAILABLE": StateUnavailableError,
    "UPSTREAM_TIMEOUT": UpstreamTimeoutError,
    "UPSTREAM_UNAVAILABLE": UpstreamUnavailableError,
    "UPSTREAM_BAD_RESPONSE": UpstreamBadResponseError,
    "UPSTREAM_TOO_LARGE": UpstreamResponseTooLargeError,
    "UPSTREAM_CLIENT_ERROR": UpstreamClientError,
    "NON_DETERMINISTIC_REPLAY": NonDeterministicReplayError,
    "OUTCOME_UNKNOWN": OutcomeUnknownError,
    "JOURNAL_UNAVAILABLE": JournalUnavailableError,
    "INTERNAL": InternalError,
}

# Statuses without Tether details: made by gRPC itself (no connection, local deadline, size).
BY_CODE: Final[dict[grpc.StatusCode, type[TetherError]]] = {
    grpc.StatusCode.UNAVAILABLE: SidecarUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: UnknownUpstreamError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: OverloadedError,
    grpc.StatusCode.UNIMPLEMENTED: NotSupportedError,
    grpc.StatusCode.CANCELLED: CallCancelledError,
}
# gRPC's own size check answers RESOURCE_EXHAUSTED with this text and no details.
_GRPC_TOO_LARGE = "larger than max"


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    trailers: Any = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def _details(rich: status_pb2.Status | None) -> tuple[str, dict[str, str], float | None]:
    reason, metadata, retry_after = "", {}, None
    for detail in rich.details if rich is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return reason, metadata, retry_after


def from_rpc_error(error: grpc.RpcError) -> TetherError:
    """The TetherError for a failed RPC (the one place gRPC statuses become exceptions)."""
    code: grpc.StatusCode = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    message: str = (error.details() if hasattr(error, "details") else None) or str(error)
    reason, metadata, retry_after = _details(_rich_status(error))
    cls = BY_REASON.get(reason) or BY_CODE.get(code, InternalError)
    if not reason and code == grpc.StatusCode.RESOURCE_EXHAUSTED and _GRPC_TOO_LARGE in message:
        cls = PayloadTooLargeError
    exc = cls(message, code=code, reason=reason, metadata=metadata, retry_after_s=retry_after)
    return exc
