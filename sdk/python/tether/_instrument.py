"""`tether.instrument()`: OpenTelemetry tracing in the agent process, joined to the sidecar's.

    handle = tether.instrument(service_name="planner")   # once, at start-up

It installs a TracerProvider (resource `service.name`) as the global one, with a
BatchSpanProcessor and an OTLP exporter configured like the sidecar's, from the standard
variables: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`, and
`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` / `OTEL_EXPORTER_OTLP_PROTOCOL` (`grpc`, the default, or
`http/protobuf`); headers, timeout, certificates and sampler from their usual variables too.
Precedence: argument > variable > default. As with the sidecar's `telemetry.traces: auto`,
nothing is exported while no endpoint is configured; spans are still made, so the trace
context reaches the sidecar (the SDK sends `traceparent` with every call) and its spans join
the agent's traces.

A process whose tracing is already set up (an SDK TracerProvider installed by its own code
or by `opentelemetry-instrument`) keeps it: `instrument()` adds no exporter then (only an
`exporter=` given), and the decorators' spans go where that set-up sends them.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import Final
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

TRACER_NAME: Final = "tether"
DEFAULT_SERVICE_NAME: Final = "tether-agent"
ENDPOINT_VARS: Final = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARS: Final = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
PROTOCOLS: Final = ("grpc", "http/protobuf")
HTTP_TRACES_PATH: Final = "/v1/traces"
SHUTDOWN_TIMEOUT_S: Final = 3.0


def stop_within(processor: BatchSpanProcessor, timeout_s: float) -> None:
    """`processor.shutdown()`, bounded: the SDK's own waits up to 30 s for a stuck export
    (the sidecar's span processor stops through this too)."""
    worker = getattr(processor, "_batch_processor", None)
    try:
        worker.shutdown(timeout_millis=max(0.0, timeout_s) * 1000)  # type: ignore[union-attr]
    except (AttributeError, TypeError):  # another SDK version: its own shutdown
        processor.shutdown()  # type: ignore[no-untyped-call]


class Instrumentation:
    """What `instrument()` set up: flush it, or shut it down (also as a `with` block).

    `provider` is the process's TracerProvider (None when `OTEL_SDK_DISABLED=true`);
    `processor` the span processor this call added (None when it added none).
    """

    def __init__(
        self,
        provider: TracerProvider | None,
        processor: BatchSpanProcessor | None,
        *,
        foreign: bool = False,
    ) -> None:
        self.provider = provider
        self.processor = processor
        self.closed = False
        self._foreign = foreign  # the process's own provider: flushing it flushes its pipeline

    def force_flush(self, timeout_s: float = 30.0) -> bool:
        """Export the spans ended so far; False when that did not finish within `timeout_s`."""
        timeout_ms = int(timeout_s * 1000)
        if self.processor is not None:
            return self.processor.force_flush(timeout_ms)
        if self._foreign and self.provider is not None:
            return self.provider.force_flush(timeout_ms)
        return True

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Flush and stop this set-up's exporter, waiting at most about `timeout_s` for an
        export in progress (a collector that does not answer cannot hold up the exit); a
        later `instrument()` starts anew. Runs at interpreter exit too."""
        global _installed
        with _lock:
            if self.closed:
                return
            self.closed = True
            if _installed is self:
                _installed = None
        if self.processor is not None:
            stop_within(self.processor, timeout_s)

    def __enter__(self) -> Instrumentation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


_lock = threading.Lock()
_installed: Instrumentation | None = None
_own_provider: TracerProvider | None = None  # the provider an earlier call installed
# The decorators' tracer: a proxy of the global provider until `instrument()` picks one.
tracer: trace.Tracer = trace.get_tracer(TRACER_NAME)


def instrument(
    service_name: str | None = None,
    *,
    endpoint: str | None = None,
    protocol: str | None = None,
    exporter: SpanExporter | None = None,
) -> Instrumentation:
    """Set up tracing for this process once; later calls return the same `Instrumentation`.

    `service_name`: argument, else `OTEL_SERVICE_NAME`, else "tether-agent".
    `endpoint`: the OTLP traces endpoint (for `http/protobuf`, `/v1/traces` is added to a URL
    without a path); else the variables. `protocol`: "grpc" or "http/protobuf"; else the
    variables, else "grpc". `exporter`: export to this instead of OTLP (e.g. an
    `InMemorySpanExporter` in tests, a `ConsoleSpanExporter` while debugging).
    """
    global _installed, _own_provider, tracer
    with _lock:
        if _installed is not None:
            return _installed
        if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            _installed = Instrumentation(None, None)
            return _installed
        provider, ours = _provider(service_name)
        if exporter is None and ours:
            exporter = otlp_exporter(endpoint, protocol)
        processor = BatchSpanProcessor(exporter) if exporter is not None else None
        if processor is not None:
            provider.add_span_processor(processor)
        tracer = provider.get_tracer(TRACER_NAME)
        _installed = Instrumentation(provider, processor, foreign=not ours)
        if processor is not None:
            atexit.register(_installed.shutdown)  # before the provider's own, unbounded one
        return _installed


def _provider(service_name: str | None) -> tuple[TracerProvider, bool]:
    """The SDK provider to use and whether it is ours (installed by `instrument`)."""
    global _own_provider
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current, current is _own_provider
    provider = TracerProvider(resource=service_resource(service_name))
    trace.set_tracer_provider(provider)
    _own_provider = provider
    return provider, True


def service_resource(service_name: str | None) -> Resource:
    """The resource: `OTEL_RESOURCE_ATTRIBUTES`, with `service.name` from the argument, else
    `OTEL_SERVICE_NAME`, else "tether-agent"."""
    resource = Resource.create({"service.name": service_name} if service_name else {})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return resource


def otlp_exporter(endpoint: str | None, protocol: str | None) -> SpanExporter | None:
    """The OTLP exporter the arguments and OTEL_* variables ask for; None without endpoint."""
    if endpoint is None and not any(os.environ.get(name) for name in ENDPOINT_VARS):
        return None
    chosen = protocol or next((os.environ[v] for v in PROTOCOL_VARS if os.environ.get(v)), "grpc")
    chosen = chosen.strip().lower()
    if chosen == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint)
    if chosen == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=http_traces_url(endpoint) if endpoint else None)
    raise ValueError(f"OTLP protocol {chosen!r} is not supported: use one of {PROTOCOLS}")


def http_traces_url(endpoint: str) -> str:
    """`endpoint` with `/v1/traces` when it has no path (as for OTEL_EXPORTER_OTLP_ENDPOINT)."""
    if urlsplit(endpoint).path in ("", "/"):
        return endpoint.rstrip("/") + HTTP_TRACES_PATH
    return endpoint


def _reset_for_tests() -> None:
    """Shut down what `instrument()` set up and forget OpenTelemetry's global provider, so
    the next test starts from a process that never traced (OpenTelemetry's own test helper
    does the same). Not for production code: the global provider is set once by design."""
    global _own_provider, tracer
    if _installed is not None:
        _installed.shutdown()
    if _own_provider is not None:
        _own_provider.shutdown()
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    _own_provider = None
    tracer = trace.get_tracer(TRACER_NAME)
