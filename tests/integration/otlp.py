"""A real OTLP/gRPC trace receiver for tests: opentelemetry-proto's TraceService on port 0."""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


@dataclass
class ReceivedSpan:
    """One exported span, flattened for assertions."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int
    service: str


@dataclass
class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
    """Collects every span exported to it; `hang` makes Export block (a stuck collector)."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    hang: bool = False
    port: int = 0
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(self, request: Any, context: Any) -> Any:
        if self.hang:
            time.sleep(30)
        with self._lock:
            for resource_spans in request.resource_spans:
                service = ""
                for attr in resource_spans.resource.attributes:
                    if attr.key == "service.name":
                        service = _value(attr.value)
                for scope in resource_spans.scope_spans:
                    self.spans.extend(self._flatten(span, service) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    @staticmethod
    def _flatten(span: Any, service: str) -> ReceivedSpan:
        return ReceivedSpan(
            name=span.name,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_id=span.parent_span_id.hex(),
            kind=span.kind,
            attributes={a.key: _value(a.value) for a in span.attributes},
            events=[(e.name, {a.key: _value(a.value) for a in e.attributes}) for e in span.events],
            status_code=span.status.code,
            service=service,
        )

    def start(self) -> OtlpReceiver:
        self._server = grpc.server(futures.ThreadPoolExecutor(4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_for(self, predicate: Any, timeout_s: float = 10.0) -> list[ReceivedSpan]:
        """Wait until `predicate(spans)` holds; returns the spans."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                spans = list(self.spans)
            if predicate(spans):
                return spans
            time.sleep(0.05)
        raise AssertionError(f"spans never matched; got {[s.name for s in self.spans]}")
