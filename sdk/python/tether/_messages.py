"""Plain-data results and the conversions between them and the wire messages."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from opentelemetry import propagate

from tether.v1 import sidecar_pb2 as pb

DEFAULT_TARGET: Final = "unix:tether.sock"
TARGET_ENV: Final = "TETHER_ADDRESS"
TOKEN_ENV: Final = "TETHER_TOKEN"
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
RECONNECT_OPTIONS: Final = (
    # A restarted sidecar is found again within a fraction of a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def channel_options(max_message_bytes: int = MAX_MESSAGE_BYTES) -> tuple[tuple[str, int], ...]:
    """The channel's options: send and receive limits of `max_message_bytes`, fast reconnect."""
    if max_message_bytes <= 0:
        raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
    return (
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *RECONNECT_OPTIONS,
    )


KINDS: Final = {pb.CALL_KIND_MODEL: "model", pb.CALL_KIND_TOOL: "tool"}
KIND_VALUES: Final = {"model": pb.CALL_KIND_MODEL, "tool": pb.CALL_KIND_TOOL}


def resolve_target(target: str | None) -> str:
    """The sidecar address: the argument, else $TETHER_ADDRESS, else `unix:tether.sock`."""
    return target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Per-call metadata: the bearer token from the argument or $TETHER_TOKEN."""
    token = token or os.environ.get(TOKEN_ENV)
    return (("authorization", f"Bearer {token}"),) if token else None


def traced(metadata: Any) -> Any:
    """`metadata` plus the W3C `traceparent` (and `tracestate`) of the current span, so the
    sidecar continues the caller's trace; unchanged when there is no span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return metadata
    return (*(metadata or ()), *carrier.items())


def encode_payload(payload: Any) -> bytes:
    """Bytes are sent as they are, str as UTF-8, anything else as JSON."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, (bytearray, memoryview)):
        return bytes(payload)
    if isinstance(payload, str):
        return payload.encode()
    return orjson.dumps(payload)


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens the upstream reported for a call."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def from_pb(cls, usage: pb.Usage) -> Usage:
        return cls(usage.input_tokens, usage.output_tokens, usage.total_tokens)


@dataclass(frozen=True, slots=True)
class Result:
    """The answer of one call: the upstream's body byte for byte, and what happened."""

    payload: bytes
    upstream: str
    attempts: int = 1
    replayed: bool = False
    usage: Usage = field(default_factory=Usage)
    upstream_status: int = 0
    idempotency_key: str = ""

    def json(self) -> Any:
        """The payload parsed as JSON."""
        return orjson.loads(self.payload)

    @classmethod
    def from_pb(cls, resp: pb.CallResponse) -> Result:
        return cls(
            payload=resp.payload,
            upstream=resp.upstream,
            attempts=resp.attempts,
            replayed=resp.replayed,
            usage=Usage.from_pb(resp.usage),
            upstream_status=resp.upstream_status,
            idempotency_key=resp.idempotency_key,
        )


@dataclass(frozen=True, slots=True)
class UpstreamStatus:
    """One upstream as the sidecar sees it now."""

    name: str
    kind: str
    type: str
    breaker_state: str
    in_flight: int
    calls: int
    errors: int
    hits: int
    gauges: Mapping[str, float]
    queued: int = 0
    retries: int = 0
    fallbacks: int = 0
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class Status:
    """The sidecar's state (GetStatus) as plain data."""

    version: str
    config_version: str
    serving: bool
    uptime_s: float
    in_flight: int
    upstreams: Mapping[str, UpstreamStatus]

    @classmethod
    def from_pb(cls, resp: pb.GetStatusResponse) -> Status:
        ups = {
            u.name: UpstreamStatus(
                u.name,
                KINDS.get(u.kind, "unspecified"),
                u.type,
                u.breaker_state,
                u.in_flight,
                u.calls,
                u.errors,
                u.hits,
                dict(u.gauges),
                u.queued,
                u.retries,
                u.fallbacks,
                u.rejected,
            )
            for u in resp.upstreams
        }
        return cls(
            resp.version, resp.config_version, resp.serving, resp.uptime_s, resp.in_flight, ups
        )


def call_request(upstream: str, kind: int, operation: str, payload: Any, **ids: Any) -> Any:
    """The CallRequest for one model or tool call (`run_id`, `idempotency_key`, `labels`)."""
    return pb.CallRequest(**_request_fields(upstream, kind, operation, payload, **ids))


def _request_fields(
    upstream: str,
    kind: int,
    operation: str,
    payload: Any,
    *,
    run_id: str = "",
    idempotency_key: str = "",
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "upstream": upstream,
        "kind": kind,
        "operation": operation,
        "payload": encode_payload(payload),
        "run_id": run_id,
        "idempotency_key": idempotency_key,
        "labels": labels,
    }


class StreamSummary:
    """What a stream reports after its last chunk: usage, attempts, which upstream."""

    __slots__ = ("attempts", "done", "replayed", "upstream", "upstream_status", "usage")

    def __init__(self) -> None:
        self.usage = Usage()
        self.attempts = 0
        self.replayed = False
        self.upstream = ""
        self.upstream_status = 0
        self.done = False

    def take_final(self, msg: pb.StreamChunk) -> None:
        self.usage = Usage.from_pb(msg.usage)
        self.attempts = msg.attempts
        self.replayed = msg.replayed
        self.upstream = msg.upstream
        self.upstream_status = msg.upstream_status
        self.done = True


def begin_request(upstream: str, kind: int, operation: str, payload: Any, **ids: Any) -> Any:
    """The BeginCallRequest of a guarded call (the same fields as a CallRequest)."""
    return pb.BeginCallRequest(**_request_fields(upstream, kind, operation, payload, **ids))


TRANSIENT_ERRORS: Final = (OSError, TimeoutError)  # OSError covers ConnectionError, sockets
# Transport failures of common HTTP clients, matched by class name (the SDK imports none):
# httpx, aiohttp, requests. A class counts when it or any of its bases has one of these names.
TRANSIENT_NAMES: Final = frozenset({
    "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout",
    "TimeoutException", "TransportError", "NetworkError", "RemoteProtocolError",  # httpx
    "ServerDisconnectedError", "ClientConnectionError", "ClientOSError",
    "ServerTimeoutError",  # aiohttp
    "ConnectionError", "Timeout", "ChunkedEncodingError",  # requests
})  # fmt: skip
# A block that did not finish (CancelledError, KeyboardInterrupt, GeneratorExit...): neither
# success nor failure of the dependency. The sidecar reads this type (and status) as neutral.
CANCELLED_TYPE: Final = "cancelled"
CANCELLED_STATUS: Final = 499


def _int_attr(obj: object, attr: str) -> int:
    value = getattr(obj, attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _error_status(exc: BaseException) -> int:
    """An HTTP status the exception carries: `status_code` or `status`, on it or on its
    `response` (httpx, requests, aiohttp); 0 when none."""
    response = getattr(exc, "response", None)
    for obj in (exc, response) if response is not None else (exc,):
        for attr in ("status_code", "status"):
            if status := _int_attr(obj, attr):
                return status
    return 0


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` says the dependency failed (connection, timeout), not the call."""
    if bool(getattr(exc, "retryable", False)) or isinstance(exc, TRANSIENT_ERRORS):
        return True
    return any(cls.__name__ in TRANSIENT_NAMES for cls in type(exc).__mro__)


def end_request(
    call_id: str, exc: BaseException | None, result: Any, usage: Usage | None
) -> pb.EndCallRequest:
    """The EndCallRequest reporting a guarded call's result or the exception it raised.

    An exception counts as transient (an upstream failure) when it is a connection error or
    timeout (OSError, TimeoutError, or an HTTP client's transport error, by class name), has
    `retryable = True`, or carries an HTTP-like status of 5xx, 408 or 429. A BaseException
    that is not an Exception (cancellation, KeyboardInterrupt) is reported as `cancelled`
    (status 499), which counts neither way.
    """
    usage_pb = (
        pb.Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens,
        )
        if usage is not None
        else None
    )
    if exc is None:
        payload = b"" if result is None else encode_payload(result)
        return pb.EndCallRequest(call_id=call_id, payload=payload, usage=usage_pb)
    message = f"{type(exc).__name__}: {exc}"[:1000]
    if not isinstance(exc, Exception):
        error = pb.CallError(type=CANCELLED_TYPE, message=message, status=CANCELLED_STATUS)
    else:
        error = pb.CallError(
            type=type(exc).__name__,
            message=str(exc)[:1000],
            status=_error_status(exc),
            retryable=is_transient(exc),
        )
    return pb.EndCallRequest(call_id=call_id, error=error, usage=usage_pb)


class GuardState:
    """A guarded block's view of its call: call `set_result` inside it.

    When `replayed` is true the journal already holds this call's outcome (a resumed run):
    `payload` is the journaled result exactly as it was recorded (bytes), `result` the same
    parsed as JSON when it is JSON (else the bytes), or `error` the journaled failure; the
    block should not repeat the call's effect. `payload` is empty when not replayed.
    """

    __slots__ = ("call_id", "error", "payload", "replayed", "result", "usage")

    def __init__(self) -> None:
        self.call_id = ""
        self.result: Any = None
        self.payload = b""
        self.usage: Usage | None = None
        self.replayed = False
        self.error: str | None = None

    def set_result(self, result: Any, usage: Usage | None = None) -> None:
        """The call's result (journaled when the block ends) and its token usage."""
        self.result = result
        self.usage = usage

    def take_begin(self, answer: pb.BeginCallResponse) -> None:
        self.call_id = answer.call_id
        if not answer.replayed:
            return
        self.replayed = True
        self.usage = Usage.from_pb(answer.usage)
        if answer.HasField("error"):
            self.error = f"{answer.error.type}: {answer.error.message}"
            return
        self.payload = answer.payload
        try:
            self.result = orjson.loads(answer.payload) if answer.payload else None
        except orjson.JSONDecodeError:
            self.result = answer.payload


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A saved snapshot of an agent's state."""

    run_id: str
    step: int
    state: bytes
    metadata: Mapping[str, str]
    saved_at: float  # seconds since the epoch

    def json(self) -> Any:
        """The state parsed as JSON."""
        return orjson.loads(self.state)

    @classmethod
    def from_pb(cls, resp: pb.LoadCheckpointResponse) -> Checkpoint:
        saved = resp.saved_at.ToNanoseconds() / 1e9
        return cls(resp.run_id, resp.step, resp.state, dict(resp.metadata), saved)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run the journal knows: its calls, latest checkpoint step, calls in doubt."""

    run_id: str
    calls: int
    latest_step: int
    in_doubt: int
    updated_at: float

    @classmethod
    def from_pb(cls, run: pb.RunInfo) -> RunInfo:
        updated = run.updated_at.ToNanoseconds() / 1e9
        return cls(run.run_id, run.calls, run.latest_step, run.in_doubt, updated)


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journaled call of a run."""

    key: str
    seq: int
    upstream: str
    operation: str
    state: str  # started, done, failed
    answered_by: str
    attempts: int
    latency_ms: float
    replays: int
    error_reason: str
    error_message: str
    retryable: bool
    too_large: bool
    stream: bool
    in_flight: bool

    @property
    def in_doubt(self) -> bool:
        """Begun, not completed, and not running now: the outcome is unknown."""
        return self.state == "started" and not self.in_flight

    @classmethod
    def from_pb(cls, e: pb.JournalEntry) -> JournalEntry:
        return cls(
            e.idempotency_key, e.seq, e.upstream, e.operation, e.state, e.answered_by,
            e.attempts, e.latency_ms, e.replays, e.error_reason, e.error_message, e.retryable,
            e.too_large, e.stream, e.in_flight,
        )  # fmt: skip


def checkpoint_request(
    run_id: str, state: Any, step: int, metadata: Mapping[str, str] | None
) -> pb.SaveCheckpointRequest:
    return pb.SaveCheckpointRequest(
        run_id=run_id, step=step, state=encode_payload(state), metadata=metadata
    )


def load_request(run_id: str, step: int | None) -> pb.LoadCheckpointRequest:
    if step is None:
        return pb.LoadCheckpointRequest(run_id=run_id)
    return pb.LoadCheckpointRequest(run_id=run_id, step=step)


def resolve_request(
    run_id: str, key: str, result: Any | None, retry: bool
) -> pb.ResolveCallRequest:
    if (result is None) == (not retry):
        raise ValueError("give exactly one of result= or retry=True")
    if retry:
        return pb.ResolveCallRequest(run_id=run_id, idempotency_key=key, retry=True)
    return pb.ResolveCallRequest(run_id=run_id, idempotency_key=key, result=encode_payload(result))
