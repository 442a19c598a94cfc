"""Cheap spans for the sidecar's own calls: the SDK's sampling, ids, resource and processors,
without its per-span machinery.

The SDK's `Tracer.start_span` does much per span (a lock, a `BoundedAttributes` that
validates every attribute on every set, limits objects, internal metrics hooks); the sidecar
makes two spans per call, and span creation was among the largest items of its own work
(the figures, before and after, are in bench/RESULTS.md, "Light spans").
`LightTracer.start_span` asks the provider's sampler and id generator exactly as the SDK
does, and returns a `LightSpan` that keeps its attributes and events in plain containers;
`end()` hands the span processors the SDK's own `ReadableSpan`, so exporters, the batch
processor and anything else on the provider see the spans they always saw.

A `LightSpan` is used from one thread (the event loop's); values of a type OTLP cannot carry
are cleaned as the SDK cleans them, and events beyond the SDK's default limit
(128) are dropped (the newest, where the SDK drops the oldest) and counted in the span.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator, Mapping
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.attributes import _clean_attribute_value  # the SDK's own rule
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import DEFAULT_ON, Decision
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util._decorator import _agnosticcontextmanager

MAX_EVENTS = 128  # the SDK's default OTEL_SPAN_EVENT_COUNT_LIMIT
_PLAIN = frozenset((str, bool, int, float))
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSET = Status(StatusCode.UNSET)
_RANDOM = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)  # the W3C level 2 flag, newer SDKs


def clean(value: Any) -> Any:
    """A value that is not plain (`_PLAIN`, kept as it is by the callers) as a span can carry
    it, by the SDK's rule: sequences as tuples, mappings copied, other objects as their text
    or None."""
    return _clean_attribute_value(value, None)


def _cleaned(attributes: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not attributes:
        return out
    for key, value in attributes.items():
        out[key] = value if type(value) in _PLAIN else clean(value)
    return out


class LightTracer(trace.Tracer):
    """`start_span` as the SDK tracer of `provider` does it, returning `LightSpan`s."""

    def __init__(self, provider: TracerProvider, sdk_tracer: Any) -> None:
        self.sampler = provider.sampler
        self.ids = provider.id_generator
        self.resource = provider.resource
        self.processor = provider._active_span_processor  # every processor on the provider
        self.scope = getattr(sdk_tracer, "_instrumentation_scope", None)
        self._random_ids = bool(_RANDOM) and self.ids.is_trace_id_random()
        # The SDK's default sampler (no OTEL_TRACES_SAMPLER): decided here as it decides,
        # without its SamplingResult per span.
        self._parent_or_on = self.sampler is DEFAULT_ON

    def start_span(self, name: str, context: Any = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Any = None, links: Any = (), start_time: int | None = None,
                   record_exception: bool = True,
                   set_status_on_exception: bool = True) -> trace.Span:  # fmt: skip
        parent: SpanContext | None = trace.get_current_span(context).get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = self.ids.generate_trace_id()
            random = self._random_ids
        else:
            trace_id = parent.trace_id
            random = bool(parent.trace_flags & _RANDOM)
        if self._parent_or_on:  # ParentBased(ALWAYS_ON): the parent's decision, else yes
            decision = Decision.DROP
            if parent is None or parent.trace_flags.sampled:
                decision = Decision.RECORD_AND_SAMPLE
            state = parent.trace_state if parent is not None else None
        else:
            result = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
            decision, state, attributes = result.decision, result.trace_state, result.attributes
        flags = _SAMPLED if decision is Decision.RECORD_AND_SAMPLE else _NOT_SAMPLED
        if random:
            flags = TraceFlags(flags | _RANDOM)
        span_context = SpanContext(trace_id, self.ids.generate_span_id(), is_remote=False,
                                   trace_flags=flags, trace_state=state)  # fmt: skip
        if decision is Decision.DROP:
            return trace.NonRecordingSpan(span_context)
        span = LightSpan(self, name, span_context, parent, kind, _cleaned(attributes),
                         start_time)  # fmt: skip
        if links:
            span.links = tuple(links)
        span.on_exception = (record_exception, set_status_on_exception)
        return span

    @_agnosticcontextmanager
    def start_as_current_span(self, name: str, context: Any = None,
                              kind: SpanKind = SpanKind.INTERNAL, attributes: Any = None,
                              links: Any = (), start_time: int | None = None,
                              record_exception: bool = True,
                              set_status_on_exception: bool = True,
                              end_on_exit: bool = True) -> Iterator[trace.Span]:  # fmt: skip
        """`start_span`, made the current span for the block (as the SDK's tracer does)."""
        span = self.start_span(name, context, kind, attributes, links, start_time)
        on_exception = {"record_exception": record_exception,
                        "set_status_on_exception": set_status_on_exception}  # fmt: skip
        with trace.use_span(span, end_on_exit=end_on_exit, **on_exception) as current:
            yield current


class LightSpan(trace.Span):
    """A recording span with plain containers; ended once, then read-only."""

    __slots__ = ("_attributes", "_context", "_dropped_events", "_ended", "_events", "_kind",
                 "_name", "_parent", "_start", "_status", "_tracer", "links",
                 "on_exception")  # fmt: skip

    def __init__(self, tracer: LightTracer, name: str, context: SpanContext,
                 parent: SpanContext | None, kind: SpanKind, attributes: dict[str, Any],
                 start_time: int | None) -> None:  # fmt: skip
        self._tracer = tracer
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._events: list[Event] = []
        self._dropped_events = 0
        self._status = _UNSET
        self._start = start_time or time_ns()
        self._ended = False
        self.links: tuple[Any, ...] = ()
        # `with tracer.start_span(...)`: record an exception leaving the block, set ERROR
        self.on_exception = (True, True)

    def get_span_context(self) -> SpanContext:
        return self._context

    def is_recording(self) -> bool:
        return not self._ended

    def set_attribute(self, key: str, value: Any) -> None:
        if self._ended:
            return
        self._attributes[key] = value if type(value) in _PLAIN else clean(value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if not self._ended:
            self._attributes.update(_cleaned(attributes))

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        if self._ended:
            return
        if len(self._events) >= MAX_EVENTS:
            self._dropped_events += 1
            return
        self._events.append(Event(name, _cleaned(attributes), timestamp or time_ns()))

    def update_name(self, name: str) -> None:
        if not self._ended:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        """As the SDK: an OK status is final, UNSET is ignored."""
        if self._ended or self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self._status = status

    def record_exception(self, exception: BaseException, attributes: Any = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:  # fmt: skip
        module, name = type(exception).__module__, type(exception).__qualname__
        found: dict[str, Any] = {
            "exception.type": f"{module}.{name}" if module and module != "builtins" else name,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            found.update(attributes)
        self.add_event("exception", found, timestamp)

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        """Ends the span; an exception leaving the block is recorded and sets ERROR first, as
        the SDK's span does (each unless `start_span` was told not to)."""
        record, set_status = self.on_exception
        if exc is not None and not self._ended:
            if record:
                self.record_exception(exc, escaped=True)
            if set_status:
                self.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self.end()

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        tracer = self._tracer
        readable = ReadableSpan(
            name=self._name, context=self._context, parent=self._parent,
            resource=tracer.resource, attributes=self._attributes, events=tuple(self._events),
            links=self.links, kind=self._kind, status=self._status, start_time=self._start,
            end_time=end_time or time_ns(), instrumentation_scope=tracer.scope,
        )  # fmt: skip
        if self._dropped_events:  # the count goes where the SDK keeps it (and OTLP sends it)
            events = BoundedList.from_seq(MAX_EVENTS, self._events)
            events.dropped = self._dropped_events
            readable._events = events
        tracer.processor.on_end(readable)
