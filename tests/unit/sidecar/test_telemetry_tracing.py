"""Span export: queue-full drops counted whatever OTEL_BSP_MAX_QUEUE_SIZE says, and a
shutdown that does not wait on a hanging exporter."""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import Tracing


class HangingExporter(SpanExporter):
    """An in-process collector that never answers: `export` blocks until shutdown."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.entered.set()
        self.release.wait(60)
        self.exported += len(spans)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.release.set()  # as closing a gRPC channel cancels the export in flight


def dropped(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value("tether_telemetry_spans_dropped_total")
    return value or 0.0


@pytest.fixture
def hanging() -> Iterator[HangingExporter]:
    exporter = HangingExporter()
    yield exporter
    exporter.release.set()


@pytest.mark.parametrize("size", [4, 3000])
def test_queue_full_drops_are_counted_at_any_queue_size(
    monkeypatch: pytest.MonkeyPatch, hanging: HangingExporter, size: int
) -> None:
    """With the exporter stuck, every span beyond the SDK's queue (as the environment sets
    it, smaller or larger than the default 2048) is counted as dropped."""
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", str(size))
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    metrics = Metrics()
    tracing = Tracing(metrics, enabled=True, exporter=hanging)
    tracing.tracer.start_span("first").end()
    assert hanging.entered.wait(5)  # the worker holds one batch, stuck in export
    created = size + 50
    for i in range(created):
        tracing.tracer.start_span(f"s{i}").end()
    assert dropped(metrics) == created - size
    hanging.release.set()
    tracing.shutdown(1.0)


def test_shutdown_does_not_wait_on_a_hanging_exporter(hanging: HangingExporter) -> None:
    """The SDK's own shutdown waits up to 30 s for the worker; ours for the given bound."""
    hanging.shutdown = lambda: None  # type: ignore[method-assign]  # a collector that never lets go
    tracing = Tracing(Metrics(), enabled=True, exporter=hanging)
    for i in range(600):
        tracing.tracer.start_span(f"s{i}").end()
    assert hanging.entered.wait(10)
    started = time.monotonic()
    tracing.shutdown(0.5)
    assert time.monotonic() - started < 3


def test_no_exit_hook_that_could_hang(
    hanging: HangingExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The provider registers no atexit shutdown: the server flushes, bounded, itself."""
    calls: list[object] = []
    original = atexit.register

    def spy(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
        calls.append(fn)
        return original(fn, *args, **kwargs)

    monkeypatch.setattr(atexit, "register", spy)
    tracing = Tracing(Metrics(), enabled=True, exporter=hanging)
    monkeypatch.undo()
    assert tracing.provider is not None
    assert not any(getattr(fn, "__self__", None) is tracing.provider for fn in calls)
    hanging.release.set()
    tracing.shutdown(0.5)
