"""The one small protocol every upstream adapter implements, and the values it exchanges.

An adapter turns an `UpstreamRequest` into an `UpstreamResponse` (or a stream of `Chunk`s) and
raises only `sidecar.errors.UpstreamError` subclasses. It does not enforce the caller's
deadline: the service wraps calls in `asyncio.timeout`, and cancellation must abort the
request on the wire. Adapters keep one pooled client each and are closed on shutdown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Kind = Literal["model", "tool"]


@dataclass(slots=True, frozen=True)
class Usage:
    """Token usage an upstream reported (zeros when it reported none)."""

    input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def from_openai(cls, usage: Any) -> Usage | None:
        """Read an OpenAI `usage` object; None when absent or malformed."""
        if not isinstance(usage, dict):
            return None
        prompt = usage.get("prompt_tokens", usage.get("input_tokens", 0))
        completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
        if not isinstance(prompt, int) or not isinstance(completion, int):
            return None
        return cls(prompt, completion)


@dataclass(slots=True)
class UpstreamRequest:
    """One call to an upstream. `body` is the payload already parsed from JSON."""

    operation: str
    payload: bytes
    body: Any
    idempotency_key: str = ""
    run_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class UpstreamResponse:
    """An upstream's whole answer; `payload` is its body byte for byte, `body` that JSON
    object parsed when the adapter parsed it anyway (telemetry reads it, not parsing again)."""

    payload: bytes
    status: int = 200
    usage: Usage | None = None
    body: dict[str, Any] | None = None


@dataclass(slots=True)
class Chunk:
    """One chunk of a streamed answer (for OpenAI: the JSON of one SSE `data:` event)."""

    data: bytes
    usage: Usage | None = None


@runtime_checkable
class Upstream(Protocol):
    """What the service needs from an upstream adapter."""

    name: str
    kind: Kind
    type: str
    timeout_s: float
    supports_stream: bool

    async def call(self, request: UpstreamRequest) -> UpstreamResponse:
        """Send one request and return the whole answer."""
        ...

    def stream(self, request: UpstreamRequest) -> AsyncIterator[Chunk]:
        """Send one request and yield the answer's chunks in order, ending cleanly or raising."""
        ...

    def validate(self, request: UpstreamRequest) -> None:
        """Raise InvalidRequestError when the request cannot be sent to this upstream."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters the upstream itself keeps (e.g. `hits` of the mock)."""
        ...

    async def start(self) -> None:
        """Open pooled clients; called once inside the running event loop."""
        ...

    async def close(self) -> None:
        """Release pooled connections."""
        ...
