"""OpenTelemetry traces: set-up from the standard OTEL_* variables, export that never blocks.

Spans go to a BatchSpanProcessor (a bounded queue drained by a background thread) and an
OTLP exporter (`OTEL_EXPORTER_OTLP_PROTOCOL`: grpc, the default, or http/protobuf;
endpoint, headers, timeout and sampler from the usual variables). A slow or absent collector
therefore never slows a call: when the queue is full or an export fails, spans are dropped
and counted in `tether_telemetry_spans_dropped_total`, and a warning is logged once per
incident.

Tracing is on when `telemetry.traces` is `on`, or `auto` (the default) and an OTLP endpoint
is configured (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), and
`OTEL_SDK_DISABLED` is not true.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from sidecar import __version__
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.spans import LightTracer
from tether._instrument import stop_within

log = logging.getLogger("tether.sidecar.telemetry")

DEFAULT_SERVICE_NAME = "tether-sidecar"
DEFAULT_MAX_QUEUE = 2048  # the SDK's default for OTEL_BSP_MAX_QUEUE_SIZE
ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def tracing_wanted(mode: str, env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether to trace: `on`, or `auto` with an OTLP endpoint set; never when disabled."""
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true" or mode == "off":
        return False
    return mode == "on" or any(env.get(name) for name in ENDPOINT_VARS)


def make_exporter() -> SpanExporter:
    """The OTLP span exporter the OTEL_* variables ask for (grpc unless http/protobuf);
    imported only here, so a sidecar without traces never loads it."""
    protocol = next((os.environ[v] for v in PROTOCOL_VARS if os.environ.get(v)), "grpc")
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from sidecar.telemetry.otlp import FastOTLPSpanExporter  # the SDK's, encoding faster

    return FastOTLPSpanExporter()


class LazyExporter(SpanExporter):
    """Builds its exporter at the first export, on the export thread: importing and setting
    up the OTLP exporter (it loads the SDK's metrics and logs packages and the protobuf
    messages) stays off the sidecar's start-up (measured in bench/RESULTS.md, "Start-up"). A
    failure to build it is logged once, as an error, and every batch is then refused (counted
    as dropped)."""

    def __init__(self, build: Callable[[], SpanExporter]) -> None:
        self._build = build
        self._inner: SpanExporter | None = None
        self._failed = False
        self._lock = threading.Lock()

    def _exporter(self) -> SpanExporter | None:
        with self._lock:
            if self._inner is None and not self._failed:
                try:
                    self._inner = self._build()
                except Exception as exc:
                    self._failed = True
                    log.error("telemetry: the span exporter could not be set up (%s); spans "
                              "are dropped", exc)  # fmt: skip
            return self._inner

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        inner = self._exporter()
        return inner.export(spans) if inner is not None else SpanExportResult.FAILURE

    def shutdown(self) -> None:
        if self._inner is not None:
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis) if self._inner is not None else True


class _Drops:
    """Counts dropped spans; logs once per incident (until an export succeeds again)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._incident = False

    def dropped(self, count: int, why: str) -> None:
        self._metrics.spans_dropped.inc(count)
        with self._lock:
            first, self._incident = not self._incident, True
        if first:
            log.warning("telemetry: dropping spans (%s); calls are not affected", why)

    def recovered(self) -> None:
        if self._incident:
            with self._lock:
                self._incident = False
            log.info("telemetry: span export works again")


class CountingExporter(SpanExporter):
    """Wraps an exporter: failed batches are counted as dropped spans."""

    def __init__(self, inner: SpanExporter, drops: _Drops) -> None:
        self._inner = inner
        self._drops = drops

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception as exc:  # the exporter must never take the worker down
            result = SpanExportResult.FAILURE
            log.debug("span export raised %r", exc)
        if result is SpanExportResult.SUCCESS:
            self._drops.recovered()
        else:
            self._drops.dropped(len(spans), "the collector is unreachable or refused them")
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class CountingBatchProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that counts the spans it drops because its queue is full.

    The queue's size is the SDK's own (`max_queue_size`, else `OTEL_BSP_MAX_QUEUE_SIZE`, else
    2048), read back from the SDK's worker so any setting counts right.
    """

    def __init__(self, exporter: SpanExporter, drops: _Drops, **options: Any) -> None:
        super().__init__(exporter, **options)
        self._drops = drops
        worker = getattr(self, "_batch_processor", None)
        self._worker_queue: Any = getattr(worker, "_queue", None)
        size = getattr(worker, "_max_queue_size", None)
        if not isinstance(size, int):
            size = getattr(self._worker_queue, "maxlen", None)
        if not isinstance(size, int):
            size = int(options.get("max_queue_size") or DEFAULT_MAX_QUEUE)
        self.max_queue_size = size

    def on_end(self, span: ReadableSpan) -> None:
        queue = self._worker_queue
        if queue is not None and len(queue) >= self.max_queue_size:
            self._drops.dropped(1, "the export queue is full")
        super().on_end(span)

    def shutdown_within(self, timeout_s: float) -> None:
        """`shutdown`, waiting at most `timeout_s` for the queued spans to leave (the SDK's
        own `shutdown` waits up to 30 s for an export stuck on a hanging collector)."""
        stop_within(self, timeout_s)


class Tracing:
    """The sidecar's tracer: a real one when tracing is on, else OpenTelemetry's no-op."""

    def __init__(self, metrics: Metrics, *, enabled: bool, exporter: SpanExporter | None = None):
        self.enabled = enabled
        self.provider: TracerProvider | None = None
        self.processor: CountingBatchProcessor | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        if not enabled:
            return
        try:
            self._start(metrics, exporter)
        except Exception as exc:  # a bad OTEL_* setting must not keep the sidecar down
            log.error("telemetry: tracing disabled, its set-up failed: %s", exc)
            self.enabled, self.provider = False, None

    def _start(self, metrics: Metrics, exporter: SpanExporter | None) -> None:
        service = os.environ.get("OTEL_SERVICE_NAME") or DEFAULT_SERVICE_NAME
        resource = Resource.create({"service.name": service, "service.version": __version__})
        # No shutdown at interpreter exit: the server flushes, bounded, when it stops; the
        # SDK's exit hook would wait up to 30 s for an export stuck on a hanging collector.
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        drops = _Drops(metrics)
        counted = CountingExporter(exporter or LazyExporter(make_exporter), drops)
        self.processor = CountingBatchProcessor(counted, drops)
        self.provider.add_span_processor(self.processor)
        # The SDK's tracer names the scope; LightTracer makes the spans (sidecar.telemetry.spans).
        self.tracer = LightTracer(
            self.provider, self.provider.get_tracer("tether.sidecar", __version__)
        )
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Flush what can be flushed within about `timeout_s`, then stop exporting. May
        still block on an export in progress: run it where that cannot hold up the exit
        (the server runs it in a daemon thread)."""
        if self.processor is not None:
            self.processor.shutdown_within(timeout_s)
        if self.provider is not None:
            self.provider.shutdown()
