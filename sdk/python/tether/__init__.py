"""Tether's Python SDK: call models and tools through the Tether sidecar.

    import tether

    with tether.Client() as client:              # $TETHER_ADDRESS or unix:tether.sock
        answer = client.model("llm", {"model": "gpt-4o", "messages": [...]})
        print(answer.json()["choices"][0]["message"]["content"])

Instrument an agent: `tether.instrument()` (OpenTelemetry), `@tether.agent` (a run and an
`invoke_agent` span), `@tether.tool` (guarded, journaled tool calls), `tether.wrap_openai` /
`tether.wrap_anthropic` (an existing client through the sidecar's HTTP front).

Errors are subclasses of `TetherError`; see `tether._errors` for the tree.
"""

from tether._agents import agent
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
    ReplayedToolError,
    SidecarUnavailableError,
    StateUnavailableError,
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
from tether._instrument import Instrumentation, instrument
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
from tether._runs import RunContext, current_run, run
from tether._tools import tool
from tether._wrap import wrap_anthropic, wrap_openai

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
    "Instrumentation",
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
    "ReplayedToolError",
    "Result",
    "Run",
    "RunContext",
    "RunInfo",
    "SidecarUnavailableError",
    "StateUnavailableError",
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
    "agent",
    "current_run",
    "instrument",
    "run",
    "tool",
    "wrap_anthropic",
    "wrap_openai",
]
