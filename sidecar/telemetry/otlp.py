"""A faster OTLP span encoder: the protobuf wire format written directly, repeats cached.

The OTLP exporter's own encoder builds one protobuf object per span, attribute and value
(`opentelemetry.exporter.otlp.proto.common`), which cost the sidecar more CPU per call than
anything of its own (bench/RESULTS.md, "Span export"). The spans of one sidecar repeat
themselves: the same resource and scope in every batch and mostly the same attribute pairs
(operation, provider, upstream, model, server). This module writes the same
`ExportTraceServiceRequest` bytes, with the encoding of each `(key, value)` pair of a plain
value cached, and the resource and scope encoded once. The exporter sends those bytes as
they are, through the SDK exporter's channel, with its retries, headers and compression.

The result equals the SDK encoder's message for message (a test compares them on every kind
of value); anything this encoder does not expect falls back to the SDK's own encoder.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

log = logging.getLogger("tether.sidecar.telemetry")

_KINDS = {SpanKind.INTERNAL: b"\x30\x01", SpanKind.SERVER: b"\x30\x02",
          SpanKind.CLIENT: b"\x30\x03", SpanKind.PRODUCER: b"\x30\x04",
          SpanKind.CONSUMER: b"\x30\x05"}  # fmt: skip
_HAS_IS_REMOTE = 0x100  # SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = 0x200  # SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE = struct.Struct("<d").pack
_CACHED_VALUE_CHARS = 128  # longer values (prompts, ids) are encoded each time
_CACHE_MAX = 4096  # pairs; the cache starts again when full
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return bytes((n,))
    if n < 0:
        n += 1 << 64  # int64: two's complement on ten bytes
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: its tag, the length, the body."""
    return tag + _varint(len(body)) + body


def _string(tag: bytes, text: str | None) -> bytes:
    """A string field; nothing for an empty or absent one (proto3's default)."""
    return _field(tag, text.encode()) if text else b""


def _value(value: Any) -> bytes:
    """An AnyValue's body."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + _DOUBLE(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _value(v)) for v in value))
    if isinstance(value, Mapping):
        pairs = b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        return _field(b"\x32", pairs)
    raise TypeError(f"cannot encode {type(value).__name__} as an attribute value")


def _key_value(key: str, value: Any) -> bytes:
    """A KeyValue's body."""
    return _field(b"\x0a", key.encode()) + _field(b"\x12", _value(value))


class SdkEncodes(Exception):
    """A span this encoder leaves to the SDK's (links, which the sidecar never makes)."""


class SpanEncoder:
    """Encodes batches of finished spans; keeps its caches between batches (one thread)."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[bytes, str, type, Any], bytes] = {}
        self._resources: dict[int, tuple[Any, bytes]] = {}
        self._scopes: dict[int, tuple[Any, bytes]] = {}

    def attributes(self, tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
        """Each attribute as a KeyValue field with this tag."""
        if not attributes:
            return b""
        pairs = self._pairs
        out = []
        # BoundedAttributes keeps a plain dict: iterating it skips the Mapping ABC's layers.
        for key, value in getattr(attributes, "_dict", attributes).items():
            kind = type(value)
            if (kind is str and len(value) > _CACHED_VALUE_CHARS) or kind not in (str, bool, int):
                out.append(_field(tag, _key_value(key, value)))
                continue
            cached = (tag, key, kind, value)
            found = pairs.get(cached)
            if found is None:
                if len(pairs) >= _CACHE_MAX:
                    pairs.clear()
                found = pairs[cached] = _field(tag, _key_value(key, value))
            out.append(found)
        return b"".join(out)

    def _resource(self, resource: Any) -> bytes:
        """ResourceSpans field 1 (the resource) and the schema URL (field 3)."""
        found = self._resources.get(id(resource))
        if found is None or found[0] is not resource:
            body = self.attributes(b"\x0a", resource.attributes)
            encoded = _field(b"\x0a", body)
            found = self._resources[id(resource)] = (resource, encoded)
        return found[1]

    def _scope(self, scope: Any) -> bytes:
        """ScopeSpans field 1 (the scope)."""
        found = self._scopes.get(id(scope))
        if found is None or found[0] is not scope:
            body = b""
            if scope is not None:
                body = (_string(b"\x0a", scope.name) + _string(b"\x12", scope.version)
                        + self.attributes(b"\x1a", scope.attributes))  # fmt: skip
            found = self._scopes[id(scope)] = (scope, _field(b"\x0a", body))
        return found[1]

    def span(self, span: ReadableSpan) -> bytes:
        """A Span's body."""
        context = span.get_span_context()
        assert context is not None
        parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"),
                 b"\x12\x08", context.span_id.to_bytes(8, "big")]  # fmt: skip
        if context.trace_state:
            state = ",".join(f"{key}={value}" for key, value in context.trace_state.items())
            parts.append(_string(b"\x1a", state))
        attributes = getattr(span, "_attributes", None)  # the span's own, not a read-only view
        parent = span.parent
        flags = _HAS_IS_REMOTE
        if parent:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
            if parent.is_remote:
                flags |= _IS_REMOTE
        if attributes is None:
            attributes = span.attributes
        parts += (_string(b"\x2a", span.name), _KINDS[span.kind],
                  b"\x39", _FIXED64(span.start_time or 0), b"\x41", _FIXED64(span.end_time or 0),
                  self.attributes(b"\x4a", attributes))  # fmt: skip
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))
        for event in span.events:
            body = (b"\x09" + _FIXED64(event.timestamp) + _string(b"\x12", event.name)
                    + self.attributes(b"\x1a", event.attributes))  # fmt: skip
            if event.dropped_attributes:
                body += b"\x20" + _varint(event.dropped_attributes)
            parts.append(_field(b"\x5a", body))
        if span.dropped_events:
            parts += (b"\x60", _varint(span.dropped_events))
        if span.links:
            raise SdkEncodes("span links")
        if span.dropped_links:
            parts += (b"\x70", _varint(span.dropped_links))
        status = span.status
        if status is not None:
            code = status.status_code.value
            body = _string(b"\x12", status.description) + (b"\x18" + _varint(code) if code else b"")
            parts.append(_field(b"\x7a", body))
        parts += (b"\x85\x01", _FIXED32(flags))
        return b"".join(parts)

    def encode(self, spans: Sequence[ReadableSpan]) -> bytes:
        """The ExportTraceServiceRequest of `spans`, grouped by resource, then by scope,
        each in the order first met (as the SDK's encoder groups them)."""
        groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
        for span in spans:
            resource = span.resource
            scope = span.instrumentation_scope or None
            scopes = groups.setdefault(id(resource), (resource, {}))[1]
            scopes.setdefault(id(scope), (scope, []))[1].append(_field(b"\x12", self.span(span)))
        out = []
        for resource, scopes in groups.values():
            body = [self._resource(resource)]
            for scope, encoded in scopes.values():
                schema = scope.schema_url if scope is not None else None
                scope_body = self._scope(scope) + b"".join(encoded) + _string(b"\x1a", schema)
                body.append(_field(b"\x12", scope_body))
            body.append(_string(b"\x1a", resource.schema_url))
            out.append(_field(b"\x0a", b"".join(body)))
        return b"".join(out)


class _RawTraceStub:
    """The trace service's Export, sent as the bytes `SpanEncoder` wrote (no request object
    built from them, then serialized again) and its answer parsed as the SDK's stub does."""

    def __init__(self, channel: Any) -> None:
        self.Export = channel.unary_unary(
            EXPORT_METHOD,
            request_serializer=None,  # the request is its own wire form
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The SDK's OTLP/gRPC span exporter (its channel, retries, headers, compression and
    timeouts) with `SpanEncoder` as its encoder, sending the encoded bytes as they are (the
    SDK's own encoder for a batch this one cannot encode)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._encoder = SpanEncoder()
        self._stub = _RawTraceStub  # also when the SDK makes a new channel to reconnect
        self._client = _RawTraceStub(self._channel)  # type: ignore[assignment]

    def _translate_data(self, data: Sequence[ReadableSpan]) -> bytes:  # type: ignore[override]
        try:
            return self._encoder.encode(data)
        except Exception as exc:  # SdkEncodes (links) is expected; anything else is logged
            if not isinstance(exc, SdkEncodes):
                log.debug("fast span encoder: %r; the SDK's encoder takes this batch", exc)
            return bytes(sdk_encode(data).SerializeToString())
