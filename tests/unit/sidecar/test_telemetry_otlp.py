"""The fast OTLP span encoder writes the very message the SDK's encoder builds."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from sidecar.telemetry.otlp import FastOTLPSpanExporter, SpanEncoder

VALUES: dict[str, Any] = {
    "s": "chat",
    "empty": "",
    "unicode": "café ☕",
    "long": "x" * 500,
    "t": True,
    "f": False,
    "zero": 0,
    "i": 42,
    "big": 2**62,
    "neg": -7,
    "most_neg": -(2**63),
    "float": 1.5,
    "negfloat": -0.25,
    "strs": ("stop", "length"),
    "ints": (1, -2, 3),
    "bools": (True, False),
    "floats": (0.5,),
    "none_in_list": (),
}


def finished(
    *, resource: Resource | None = None, limits: SpanLimits | None = None, scope: str = "t"
) -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider(resource=resource or Resource.create({"service.name": "x"}),
                              span_limits=limits)  # fmt: skip
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def same(spans: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> None:
    fast = ExportTraceServiceRequest.FromString(SpanEncoder().encode(spans))
    assert fast == encode_spans(spans)


def test_every_kind_of_value_kind_and_status_encodes_as_the_sdk_does() -> None:
    """Attributes of every type, every span kind, events, statuses, parents: equal messages."""
    provider, exporter = finished()
    tracer = provider.get_tracer("tether.sidecar", "1.2.3")
    for kind in SpanKind:
        with tracer.start_as_current_span(f"s {kind.name}", kind=kind, attributes=VALUES) as span:
            span.add_event("retry.scheduled", {"tether.upstream": "u", "delay_s": 0.25})
            span.add_event("bare")
            with tracer.start_as_current_span("child", kind=SpanKind.CLIENT) as child:
                child.set_status(Status(StatusCode.ERROR, "timeout"))
            span.set_status(Status(StatusCode.OK))
    spans = exporter.get_finished_spans()
    assert len(spans) == 2 * len(SpanKind)
    same(spans)


def test_remote_parent_trace_state_and_unset_status() -> None:
    """A span under a remote parent with a trace state keeps its flags and state."""
    provider, exporter = finished()
    tracer = provider.get_tracer("t")
    parent = SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331,
        is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "v1"), ("other", "x")]),
    )  # fmt: skip
    context = trace.set_span_in_context(trace.NonRecordingSpan(parent))
    tracer.start_span("remote child", context=context, kind=SpanKind.SERVER).end()
    tracer.start_span("root").end()
    same(exporter.get_finished_spans())


def test_dropped_attributes_and_events_are_counted_alike() -> None:
    """Span limits: the dropped counts travel as the SDK sends them."""
    provider, exporter = finished(limits=SpanLimits(max_span_attributes=2, max_events=1,
                                                    max_event_attributes=1))  # fmt: skip
    span = provider.get_tracer("t").start_span("limited", attributes={"a": 1, "b": 2, "c": 3})
    span.add_event("one", {"x": 1, "y": 2})
    span.add_event("two")
    span.end()
    (found,) = exporter.get_finished_spans()
    assert found.dropped_attributes == 1 and found.dropped_events == 1
    same([found])


def test_spans_of_several_resources_and_scopes_group_like_the_sdk() -> None:
    """Two providers (resources) and two scopes, interleaved: grouped in first-met order."""
    one, first = finished(resource=Resource.create({"service.name": "one"}))
    two, second = finished(resource=Resource({"service.name": "two", "n": 2}, "https://s/1"))
    spans: list[ReadableSpan] = []
    for i in range(3):
        for provider in (one, two):
            provider.get_tracer("a", "1").start_span(f"a{i}").end()
            provider.get_tracer("b", schema_url="https://schema/b").start_span(f"b{i}").end()
    spans = [*first.get_finished_spans(), *second.get_finished_spans()]
    spans.sort(key=lambda s: s.start_time or 0)
    same(spans)
    encoder = SpanEncoder()  # its caches serve later batches just as well
    for _ in range(2):
        got = ExportTraceServiceRequest.FromString(encoder.encode(spans))
        assert got == encode_spans(spans)


def test_the_exporter_falls_back_to_the_sdk_encoder_for_links() -> None:
    """A batch with span links (not encoded here) still leaves, by the SDK's encoder."""
    provider, exporter = finished()
    tracer = provider.get_tracer("t")
    other = tracer.start_span("other")
    other.end()
    tracer.start_span("linked", links=[Link(other.get_span_context(), {"k": "v"})]).end()
    spans = exporter.get_finished_spans()
    otlp = FastOTLPSpanExporter(endpoint="localhost:1", insecure=True)
    try:
        assert ExportTraceServiceRequest.FromString(otlp._translate_data(spans)) == encode_spans(
            spans
        )
        plain = spans[:1]
        assert otlp._translate_data(plain) == SpanEncoder().encode(plain)  # the fast one
    finally:
        otlp.shutdown()
