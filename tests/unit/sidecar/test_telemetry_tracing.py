"""Span export: queue-full drops counted whatever OTEL_BSP_MAX_QUEUE_SIZE says, and a
shutdown that does not wait on a hanging exporter."""

from __future__ import annotations

import atexit
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.tracing import LazyExporter, Tracing


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


class Recording(SpanExporter):
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.thread: str | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.thread = threading.current_thread().name
        self.batches.append(len(spans))
        return SpanExportResult.SUCCESS


def test_the_exporter_is_built_at_the_first_export_off_the_calling_thread() -> None:
    built: list[Recording] = []

    def build() -> Recording:
        built.append(Recording())
        return built[-1]

    processor = BatchSpanProcessor(LazyExporter(build), schedule_delay_millis=50)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    provider.get_tracer("t").start_span("s").end()
    assert built == []  # nothing built until a batch leaves
    deadline = time.monotonic() + 5
    while not (built and built[0].batches) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(built) == 1 and built[0].batches == [1]
    assert built[0].thread != threading.current_thread().name
    provider.shutdown()


def test_a_traced_sidecar_loads_the_otlp_exporter_only_to_export() -> None:
    """Start-up (Telemetry with tracing on) does not import the OTLP exporter; the first
    export does, on the export thread."""
    module = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
    probe = (
        "import os, sys\n"
        "os.environ['OTEL_EXPORTER_OTLP_ENDPOINT'] = 'http://127.0.0.1:9'\n"
        "os.environ['OTEL_EXPORTER_OTLP_TIMEOUT'] = '1'\n"
        "from sidecar.config import parse_config\n"
        "from sidecar.telemetry.hub import Telemetry\n"
        "t = Telemetry(parse_config({'upstreams': {'m': {'kind': 'model', 'type': 'mock'}},"
        " 'telemetry': {'traces': 'on'}}))\n"
        f"print({module!r} in sys.modules)\n"
        "t.tracer.start_span('s').end()\n"
        "t.tracing.provider.force_flush(3000)\n"
        f"print({module!r} in sys.modules)\n"
        "t.shutdown(0.5)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    assert out.stdout.split() == ["False", "True"]


def test_an_exporter_that_cannot_be_built_drops_spans_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = [0]

    def broken() -> SpanExporter:
        calls[0] += 1
        raise ValueError("bad OTEL_EXPORTER_OTLP_CERTIFICATE")

    lazy = LazyExporter(broken)
    with caplog.at_level("ERROR", logger="tether.sidecar.telemetry"):
        assert lazy.export([]) is SpanExportResult.FAILURE
        assert lazy.export([]) is SpanExportResult.FAILURE
    assert calls == [1]
    assert [r.getMessage() for r in caplog.records] == [
        "telemetry: the span exporter could not be set up (bad OTEL_EXPORTER_OTLP_CERTIFICATE); "
        "spans are dropped"
    ]
    assert lazy.force_flush() is True
    lazy.shutdown()  # nothing built: nothing to shut down
