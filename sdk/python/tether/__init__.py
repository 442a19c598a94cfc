"""Tether's Python SDK: call models and tools through the Tether sidecar.

    import tether

    with tether.Client() as client:              # $TETHER_ADDRESS or unix:tether.sock
        answer = client.model("llm", {"model": "gpt-4o", "messages": [...]})
        print(answer.json()["choices"][0]["message"]["content"])

Errors are subclasses of `TetherError`; see `tether._errors` for the tree.
"""

from tether._async_client import AsyncClient, AsyncGuard, AsyncRun, AsyncStream
from tether._client import Client, Guard, Run, Stream
from tether._errors import (
    CallCancelledError,
    CircuitOpenError,
    DeadlineExceededError,
    DrainingError,
    InternalError,
    InvalidRequestError,
    JournalError,
    JournalUnavailableError,
    NonDeterministicReplayError,
    NotFoundError,
    NotSupportedError,
    OutcomeUnknownError,
    OverloadedError,
    PayloadTooLargeError,
    PolicyError,
    RateLimitedError,
    SidecarUnavailableError,
    TetherError,
    UnauthenticatedError,
    UnknownUpstreamError,
    UpstreamBadResponseError,
    UpstreamClientError,
    UpstreamError,
    UpstreamResponseTooLargeError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from tether._messages import (
    Checkpoint,
    GuardState,
    JournalEntry,
    Result,
    RunInfo,
    Status,
    StreamSummary,
    UpstreamStatus,
    Usage,
)

__all__ = [
    "AsyncClient",
    "AsyncGuard",
    "AsyncRun",
    "AsyncStream",
    "CallCancelledError",
    "Checkpoint",
    "CircuitOpenError",
    "Client",
    "DeadlineExceededError",
    "DrainingError",
    "Guard",
    "GuardState",
    "InternalError",
    "InvalidRequestError",
    "JournalEntry",
    "JournalError",
    "JournalUnavailableError",
    "NonDeterministicReplayError",
    "NotFoundError",
    "NotSupportedError",
    "OutcomeUnknownError",
    "OverloadedError",
    "PayloadTooLargeError",
    "PolicyError",
    "RateLimitedError",
    "Result",
    "Run",
    "RunInfo",
    "SidecarUnavailableError",
    "Status",
    "Stream",
    "StreamSummary",
    "TetherError",
    "UnauthenticatedError",
    "UnknownUpstreamError",
    "UpstreamBadResponseError",
    "UpstreamClientError",
    "UpstreamError",
    "UpstreamResponseTooLargeError",
    "UpstreamStatus",
    "UpstreamTimeoutError",
    "UpstreamUnavailableError",
    "Usage",
]
