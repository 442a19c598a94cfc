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

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

if _TYPE_CHECKING:
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

_WHERE = {  # each public name: the module that defines it, imported at first use
    "agent": "tether._agents",
    "AsyncClient": "tether._async_client",
    "AsyncGuard": "tether._async_client",
    "AsyncRun": "tether._async_client",
    "AsyncStream": "tether._async_client",
    "Client": "tether._client",
    "Guard": "tether._client",
    "Run": "tether._client",
    "Stream": "tether._client",
    "CallCancelledError": "tether._errors",
    "CircuitOpenError": "tether._errors",
    "DeadlineExceededError": "tether._errors",
    "DrainingError": "tether._errors",
    "InternalError": "tether._errors",
    "InvalidRequestError": "tether._errors",
    "JournalError": "tether._errors",
    "JournalUnavailableError": "tether._errors",
    "NonDeterministicReplayError": "tether._errors",
    "NotFoundError": "tether._errors",
    "NotSupportedError": "tether._errors",
    "OutcomeUnknownError": "tether._errors",
    "OverloadedError": "tether._errors",
    "PayloadTooLargeError": "tether._errors",
    "PolicyError": "tether._errors",
    "RateLimitedError": "tether._errors",
    "ReplayedToolError": "tether._errors",
    "SidecarUnavailableError": "tether._errors",
    "StateUnavailableError": "tether._errors",
    "TetherError": "tether._errors",
    "UnauthenticatedError": "tether._errors",
    "UnknownUpstreamError": "tether._errors",
    "UpstreamBadResponseError": "tether._errors",
    "UpstreamClientError": "tether._errors",
    "UpstreamError": "tether._errors",
    "UpstreamResponseTooLargeError": "tether._errors",
    "UpstreamTimeoutError": "tether._errors",
    "UpstreamUnavailableError": "tether._errors",
    "Instrumentation": "tether._instrument",
    "instrument": "tether._instrument",
    "Checkpoint": "tether._messages",
    "GuardState": "tether._messages",
    "JournalEntry": "tether._messages",
    "Result": "tether._messages",
    "RunInfo": "tether._messages",
    "Status": "tether._messages",
    "StreamSummary": "tether._messages",
    "UpstreamStatus": "tether._messages",
    "Usage": "tether._messages",
    "RunContext": "tether._runs",
    "current_run": "tether._runs",
    "run": "tether._runs",
    "tool": "tether._tools",
    "wrap_anthropic": "tether._wrap",
    "wrap_openai": "tether._wrap",
}


def __getattr__(name: str) -> _Any:
    """`tether.X` imports X's module at first use: `import tether` stays cheap, and the
    sidecar, which imports only the generated messages (`tether.v1`), loads none of the SDK
    (its start-up time: bench/RESULTS.md, "Start-up")."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'tether' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


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
