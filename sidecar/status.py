"""The one table from internal errors to gRPC status codes with rich details.

Every error leaves the sidecar as a gRPC status whose details carry a
`google.rpc.ErrorInfo` (domain `tether.dev`, a stable `reason`, metadata such as the upstream
and its HTTP status), a `google.rpc.RetryInfo` when waiting would help, and a
`google.rpc.QuotaFailure` for size limits. The SDK's `tether._errors` mirrors this table by
`reason`; a test keeps the two in step.

| internal error                 | gRPC code           | reason                 |
| ------------------------------ | ------------------- | ---------------------- |
| InvalidRequestError            | INVALID_ARGUMENT    | INVALID_REQUEST        |
| UnknownUpstreamError           | NOT_FOUND           | UNKNOWN_UPSTREAM       |
| PayloadTooLargeError           | RESOURCE_EXHAUSTED  | PAYLOAD_TOO_LARGE      |
| UnauthenticatedError           | UNAUTHENTICATED     | UNAUTHENTICATED        |
| NotFoundError                  | NOT_FOUND           | NOT_FOUND              |
| DrainingError                  | UNAVAILABLE         | DRAINING               |
| NotSupportedError         | UNIMPLEMENTED       | NOT_IMPLEMENTED        |
| CircuitOpenError               | UNAVAILABLE         | CIRCUIT_OPEN           |
| RateLimitedError               | RESOURCE_EXHAUSTED  | RATE_LIMITED           |
| OverloadedError                | RESOURCE_EXHAUSTED  | OVERLOADED             |
| StateUnavailableError          | UNAVAILABLE         | STATE_UNAVAILABLE      |
| UpstreamTimeoutError           | DEADLINE_EXCEEDED   | UPSTREAM_TIMEOUT       |
| UpstreamUnavailableError       | UNAVAILABLE         | UPSTREAM_UNAVAILABLE   |
| UpstreamBadResponseError       | UNAVAILABLE         | UPSTREAM_BAD_RESPONSE  |
| UpstreamResponseTooLargeError  | RESOURCE_EXHAUSTED  | UPSTREAM_TOO_LARGE     |
| UpstreamClientError            | by HTTP status, below | UPSTREAM_CLIENT_ERROR |
| NonDeterministicReplayError    | FAILED_PRECONDITION | NON_DETERMINISTIC_REPLAY |
| OutcomeUnknownError            | ABORTED             | OUTCOME_UNKNOWN        |
| JournalUnavailableError        | UNAVAILABLE         | JOURNAL_UNAVAILABLE    |
| JournaledError                 | the original's code | the original's reason  |
| any other exception            | INTERNAL            | INTERNAL               |

An upstream 4xx keeps its HTTP status in ErrorInfo.metadata["http_status"]; its gRPC code is
the nearest one: 400/422 INVALID_ARGUMENT, 401/403 PERMISSION_DENIED (the sidecar's credentials
were refused, not the caller's), 404 NOT_FOUND, 408 DEADLINE_EXCEEDED, 409 ABORTED,
413 RESOURCE_EXHAUSTED, 429 RESOURCE_EXHAUSTED, other 4xx FAILED_PRECONDITION.
"""

from __future__ import annotations

from typing import Final

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from sidecar import errors

DOMAIN: Final = "tether.dev"
DETAILS_KEY: Final = "grpc-status-details-bin"

TABLE: Final[dict[type[errors.SidecarError], tuple[grpc.StatusCode, str]]] = {
    errors.InvalidRequestError: (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST"),
    errors.UnknownUpstreamError: (grpc.StatusCode.NOT_FOUND, "UNKNOWN_UPSTREAM"),
    errors.PayloadTooLargeError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE"),
    errors.UnauthenticatedError: (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
    errors.NotFoundError: (grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
    errors.DrainingError: (grpc.StatusCode.UNAVAILABLE, "DRAINING"),
    errors.NotSupportedError: (grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED"),
    errors.CircuitOpenError: (grpc.StatusCode.UNAVAILABLE, "CIRCUIT_OPEN"),
    errors.RateLimitedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
    errors.OverloadedError: (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED"),
    errors.StateUnavailableError: (grpc.StatusCode.UNAVAILABLE, "STATE_UNAVAILABLE"),
    errors.UpstreamTimeoutError: (grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT"),
    errors.UpstreamUnavailableError: (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
    errors.UpstreamBadResponseError: (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_BAD_RESPONSE"),
    errors.UpstreamResponseTooLargeError: (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "UPSTREAM_TOO_LARGE",
    ),
    errors.UpstreamClientError: (grpc.StatusCode.FAILED_PRECONDITION, "UPSTREAM_CLIENT_ERROR"),
    errors.NonDeterministicReplayError: (
        grpc.StatusCode.FAILED_PRECONDITION,
        "NON_DETERMINISTIC_REPLAY",
    ),
    errors.OutcomeUnknownError: (grpc.StatusCode.ABORTED, "OUTCOME_UNKNOWN"),
    errors.JournalUnavailableError: (grpc.StatusCode.UNAVAILABLE, "JOURNAL_UNAVAILABLE"),
}

INTERNAL: Final = (grpc.StatusCode.INTERNAL, "INTERNAL")

HTTP_4XX_CODES: Final[dict[int, grpc.StatusCode]] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.PERMISSION_DENIED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and ErrorInfo reason for an exception (INTERNAL when not ours)."""
    if not isinstance(exc, errors.SidecarError):
        return INTERNAL
    if isinstance(exc, errors.JournaledError):
        return getattr(grpc.StatusCode, exc.code_name, grpc.StatusCode.UNKNOWN), exc.reason
    for cls in type(exc).__mro__:
        entry = TABLE.get(cls)
        if entry is not None:
            code, reason = entry
            if isinstance(exc, errors.UpstreamClientError):
                code = HTTP_4XX_CODES.get(exc.http_status, code)
            return code, reason
    return INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_rich_status(exc: BaseException) -> tuple[grpc.StatusCode, str, status_pb2.Status]:
    """Code, message and google.rpc.Status (with details) for an exception."""
    code, reason = classify(exc)
    if isinstance(exc, errors.SidecarError):
        message, metadata = exc.message, exc.metadata()
    else:
        message, metadata = "internal error in the sidecar", {"exception": type(exc).__name__}
    details = [_pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata))]
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None and retry_after >= 0:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    if isinstance(exc, errors.PayloadTooLargeError):
        violation = error_details_pb2.QuotaFailure.Violation(
            subject="payload", description=exc.message
        )
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[violation])))
    rich = status_pb2.Status(code=code.value[0], message=message, details=details)
    return code, message, rich


def trailing_metadata(rich: status_pb2.Status) -> tuple[tuple[str, bytes], ...]:
    """The trailer that carries google.rpc.Status, as grpcio-status reads it."""
    return ((DETAILS_KEY, rich.SerializeToString()),)
