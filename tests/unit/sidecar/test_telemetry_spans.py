"""LightTracer and LightSpan make the spans the SDK's tracer makes, as exporters see them."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode

from sidecar.telemetry.otlp import SpanEncoder
from sidecar.telemetry.spans import MAX_EVENTS, LightSpan, LightTracer


def tracers(sampler: Any = None) -> tuple[Any, LightTracer, InMemorySpanExporter]:
    provider = TracerProvider(sampler=sampler) if sampler else TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    sdk = provider.get_tracer("tether.sidecar", "9.9")
    return sdk, LightTracer(provider, sdk), exporter


def script(tracer: Any) -> None:
    """The same work on either tracer: a server span with a child, attributes of every kind,
    an event, an error status; changes after the end are ignored."""
    parent = tracer.start_span("tether.Call", kind=SpanKind.SERVER,
                               attributes={"tether.upstream": "m", "n": 3, "on": True})  # fmt: skip
    child = tracer.start_span("chat m", context=trace.set_span_in_context(parent),
                              kind=SpanKind.CLIENT, attributes={"x": 1.5})  # fmt: skip
    child.set_attributes({"reasons": ["stop", "length"], "obj": object.__name__})
    child.set_attribute("gen_ai.usage.input_tokens", 7)
    child.add_event("retry.scheduled", {"delay_s": 0.1, "reason": "status_503"}, timestamp=5)
    child.set_status(Status(StatusCode.ERROR, "timeout"))
    child.end()
    child.set_attribute("late", 1)
    child.add_event("late")
    parent.set_status(StatusCode.OK)
    parent.set_status(Status(StatusCode.ERROR, "ignored: OK is final"))
    parent.end()
    parent.end()


def comparable(span: ReadableSpan) -> dict[str, Any]:
    return {
        "name": span.name, "kind": span.kind, "attributes": dict(span.attributes or {}),
        "events": [(e.name, dict(e.attributes or {}), e.timestamp) for e in span.events],
        "status": (span.status.status_code, span.status.description),
        "has_parent": span.parent is not None, "scope": span.instrumentation_scope,
        "resource": span.resource.attributes, "sampled": span.context.trace_flags.sampled,
    }  # fmt: skip


def test_light_spans_equal_the_sdks_spans() -> None:
    sdk, _, sdk_out = tracers()
    _, light, light_out = tracers()
    script(sdk)
    script(light)
    made = light_out.get_finished_spans()
    assert [comparable(s) for s in made] == [comparable(s) for s in sdk_out.get_finished_spans()]
    child, parent = made
    assert child.parent is not None and parent.context is not None
    assert child.parent.span_id == parent.context.span_id
    assert child.context is not None and child.context.trace_id == parent.context.trace_id
    assert child.attributes is not None and child.attributes["reasons"] == ("stop", "length")


def test_light_spans_encode_as_the_sdks_do() -> None:
    """The OTLP bytes of a light span equal those of the SDK span with the same ids/times."""
    _, light, out = tracers()
    script(light)
    encoder = SpanEncoder()
    for span in out.get_finished_spans():
        assert encoder.span(span)  # encodes without falling back
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    spans = out.get_finished_spans()
    assert encoder.encode(spans) == encode_spans(spans).SerializeToString()


def test_a_remote_parent_keeps_its_trace_and_not_sampled_records_nothing() -> None:
    _, light, out = tracers(ParentBased(ALWAYS_OFF))
    root = light.start_span("tether.Call")
    assert not root.is_recording() and not isinstance(root, LightSpan)
    assert root.get_span_context().is_valid  # ids still made, so the trace propagates
    assert not root.get_span_context().trace_flags.sampled
    remote = trace.SpanContext(0xABC, 0xDEF, is_remote=True,
                               trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED))  # fmt: skip
    child = light.start_span("tether.Call", context=trace.set_span_in_context(
        trace.NonRecordingSpan(remote)))  # fmt: skip
    assert child.is_recording()
    child.end()
    root.end()
    (span,) = out.get_finished_spans()
    assert span.context is not None and span.context.trace_id == 0xABC
    assert span.parent is not None and span.parent.is_remote and span.parent.span_id == 0xDEF


def test_ratio_sampling_decides_as_the_sdk() -> None:
    sdk, light, _ = tracers(TraceIdRatioBased(0.5))
    for _ in range(200):  # the same trace id: the same decision from both
        context = trace.set_span_in_context(sdk.start_span("root"))
        assert (light.start_span("s", context=context).is_recording()
                == sdk.start_span("s", context=context).is_recording())  # fmt: skip
    kept = sum(light.start_span("s").is_recording() for _ in range(2000))
    assert 800 < kept < 1200


def test_events_over_the_limit_are_dropped_and_counted() -> None:
    _, light, out = tracers()
    span = light.start_span("s")
    for i in range(MAX_EVENTS + 5):
        span.add_event(f"e{i}")
    span.end()
    (made,) = out.get_finished_spans()
    assert len(made.events) == MAX_EVENTS and made.dropped_events == 5
    assert made.events[-1].name == f"e{MAX_EVENTS - 1}"


@pytest.mark.parametrize(("value", "kept"), [
    ([1, 2], (1, 2)), (("a",), ("a",)), (b"raw", b"raw"), (None, None), ({"k": 1}, {"k": 1}),
])  # fmt: skip
def test_values_are_cleaned_as_the_sdk_cleans_them(value: Any, kept: Any) -> None:
    sdk, light, out = tracers()
    for tracer in (sdk, light):
        span = tracer.start_span("s")
        span.set_attribute("v", value)
        span.end()
    made_sdk, made_light = out.get_finished_spans()
    assert dict(made_light.attributes or {}) == dict(made_sdk.attributes or {})
    assert (made_light.attributes or {}).get("v") == kept


def test_record_exception_is_an_exception_event() -> None:
    _, light, out = tracers()
    span = light.start_span("s")
    try:
        raise ValueError("bad")
    except ValueError as exc:
        span.record_exception(exc, {"extra": 1})
    span.end()
    (event,) = out.get_finished_spans()[0].events
    assert event.name == "exception" and event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"
    assert event.attributes["exception.message"] == "bad"
    assert "raise ValueError" in str(event.attributes["exception.stacktrace"])
    assert event.attributes["extra"] == 1


@pytest.mark.parametrize("sampled", [True, False])
@pytest.mark.parametrize("sampler", [None, ParentBased(TraceIdRatioBased(1.0))])
def test_the_default_sampler_decides_as_the_sdk(sampled: bool, sampler: Any) -> None:
    """The default sampler (decided without the SDK's SamplingResult) and any other give
    the SDK's decision, trace state and attributes under a remote parent and at the root."""
    sdk, light, out = tracers(sampler)
    flags = trace.TraceFlags(trace.TraceFlags.SAMPLED if sampled else trace.TraceFlags.DEFAULT)
    remote = trace.SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=flags,
                               trace_state=trace.TraceState([("vendor", "x")]))  # fmt: skip
    parent = trace.set_span_in_context(trace.NonRecordingSpan(remote))
    for context in (parent, None):
        made = [t.start_span("s", context=context, attributes={"a": [1]}) for t in (sdk, light)]
        got = [(s.is_recording(), s.get_span_context().trace_flags.sampled,
                s.get_span_context().trace_state) for s in made]  # fmt: skip
        assert got[0] == got[1]
        for span in made:
            span.end()
    finished = out.get_finished_spans()
    assert len(finished) == (4 if sampled else 2)
    assert all(dict(s.attributes or {}) == {"a": (1,)} for s in finished)


def exception_view(span: ReadableSpan) -> tuple[Any, ...]:
    """What an exception left on a span, without the stack trace (its lines differ)."""
    events = [(e.name, (e.attributes or {}).get("exception.type"),
               (e.attributes or {}).get("exception.message"),
               (e.attributes or {}).get("exception.escaped")) for e in span.events]  # fmt: skip
    return span.name, events, span.status.status_code, span.status.description


@pytest.mark.parametrize("record", [True, False])
def test_a_block_left_by_an_exception_is_recorded_as_the_sdk_records_it(record: bool) -> None:
    """`with start_span(...)` and `with start_as_current_span(...)`: the exception becomes an
    event and an ERROR status (unless told not to), the span ends, and inside the second
    block the span is the current one."""
    sdk, light, out = tracers()
    for tracer in (sdk, light):
        with (
            pytest.raises(ValueError),
            tracer.start_span("plain", record_exception=record, set_status_on_exception=record),
        ):
            raise ValueError("bad")
        with (
            pytest.raises(KeyError),
            tracer.start_as_current_span(
                "current", record_exception=record, set_status_on_exception=record
            ) as span,
        ):
            assert trace.get_current_span() is span
            raise KeyError("k")
    made = out.get_finished_spans()
    assert len(made) == 4
    assert [exception_view(s) for s in made[2:]] == [exception_view(s) for s in made[:2]]
    assert bool(made[2].events) is record
    assert trace.get_current_span() is trace.INVALID_SPAN
