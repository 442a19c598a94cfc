"""Plain-data results and the conversions between them and the wire messages."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from tether.v1 import sidecar_pb2 as pb

DEFAULT_TARGET: Final = "unix:tether.sock"
TARGET_ENV: Final = "TETHER_ADDRESS"
TOKEN_ENV: Final = "TETHER_TOKEN"
MAX_MESSAGE_BYTES: Final = 64 * 1024 * 1024
CHANNEL_OPTIONS: Final = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A restarted sidecar is found again within a fraction of a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
KINDS: Final = {pb.CALL_KIND_MODEL: "model", pb.CALL_KIND_TOOL: "tool"}


def resolve_target(target: str | None) -> str:
    """The sidecar address: the argument, else $TETHER_ADDRESS, else `unix:tether.sock`."""
    return target or os.environ.get(TARGET_ENV) or DEFAULT_TARGET


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """Per-call metadata: the bearer token from the argument or $TETHER_TOKEN."""
    token = token or os.environ.get(TOKEN_ENV)
    return (("authorization", f"Bearer {token}"),) if token else None


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
            )
            for u in resp.upstreams
        }
        return cls(
            resp.version, resp.config_version, resp.serving, resp.uptime_s, resp.in_flight, ups
        )


def call_request(
    upstream: str,
    kind: int,
    operation: str,
    payload: Any,
    *,
    run_id: str = "",
    idempotency_key: str = "",
    labels: Mapping[str, str] | None = None,
) -> pb.CallRequest:
    """The CallRequest for one model or tool call."""
    return pb.CallRequest(
        upstream=upstream,
        kind=kind,  # type: ignore[arg-type]
        operation=operation,
        payload=encode_payload(payload),
        run_id=run_id,
        idempotency_key=idempotency_key,
        labels=labels,
    )


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
