"""Per-call telemetry: the sidecar's span, a CLIENT span per upstream attempt, metrics, logs.

The pipeline reports what happens to a call through a `CallObserver` (attempts, retries,
waits, refusals, fallbacks, journal replays); `TracedCall` turns that into OpenTelemetry
spans and events following the GenAI semantic conventions, and into the metrics of
`sidecar.telemetry.metrics`. With tracing off the spans are no-ops and only metrics are
recorded. Prompt and completion text reach spans only when content capture is on, redacted
of every configured secret; API keys are never recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from sidecar import errors, status
from sidecar.upstreams.base import UpstreamRequest, UpstreamResponse, Usage

log = logging.getLogger("tether.sidecar.calls")

PROVIDERS = {"openai": "openai", "mock": "tether.mock", "http": "tether.http",
             "guarded": "tether.guarded"}  # fmt: skip
POLICY_METRICS = {
    "breaker.rejected": "breaker_rejections",
    "rate_limit.rejected": "rate_limit_rejections",
    "bulkhead.rejected": "bulkhead_rejections",
    "retry.budget_exhausted": "retry_budget_exhausted",
    "journal.replay": "journal_replays",
    "journal.in_doubt": "journal_in_doubt",
    "journal.too_large": "journal_too_large",
}


class CallObserver:
    """What the pipeline reports about a call; this base records nothing."""

    def attempt_start(self, upstream: str, attempt: int) -> Any:
        return None

    def attempt_end(self, token: Any, response: UpstreamResponse | None, exc: Any) -> None:
        """An attempt ended with `response` or the exception `exc`."""

    def first_chunk(self) -> None:
        """The first chunk of a streamed answer arrived."""

    def event(self, name: str, upstream: str, **attributes: Any) -> None:
        """A policy did something: retry scheduled, wait, refusal, fallback, replay."""


NULL_OBSERVER = CallObserver()


def model_of(body: Any) -> str:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model else "unknown"


def server_of(url: str | None) -> tuple[str, int]:
    if not url:
        return "", 0
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


class TracedCall(CallObserver):
    """Spans and metrics of one proxied call."""

    def __init__(self, telemetry: Any, route: Any, request: UpstreamRequest, *, rpc: str,
                 stream: bool, metadata: Any) -> None:  # fmt: skip
        self.t = telemetry
        self.route = route
        self.request = request
        self.stream = stream
        self.started = time.perf_counter()
        self.upstream_s = 0.0
        self._finished = False
        self.model = model_of(request.body)
        self.operation = "execute_tool" if route.upstream.kind == "tool" else request.operation
        parent = propagate.extract(dict(metadata or ())) if metadata else None
        self.span = telemetry.tracer.start_span(
            f"tether.{rpc}", context=parent, kind=SpanKind.SERVER,
            attributes=self._call_attributes(),
        )  # fmt: skip
        self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def _call_attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "tether.upstream": self.route.name,
            "gen_ai.operation.name": self.operation,
            "gen_ai.request.stream": self.stream,
        }
        if self.request.run_id:
            attrs["gen_ai.conversation.id"] = self.request.run_id
        if self.request.idempotency_key:
            attrs["tether.idempotency_key"] = self.request.idempotency_key
        return attrs

    def _attempt_name(self, upstream: Any) -> str:
        if upstream.kind == "tool":
            return f"execute_tool {self.request.operation or upstream.name}"
        return f"{self.request.operation or 'chat'} {self.model}"

    def attempt_start(self, upstream: str, attempt: int) -> Any:
        route = self.t.routes.get(upstream, self.route)
        address, port = server_of(getattr(route.upstream, "target_url", None))
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.provider.name": PROVIDERS.get(route.upstream.type, route.upstream.type),
            "gen_ai.request.stream": self.stream,
            "tether.upstream": upstream,
            "tether.attempt": attempt,
        }
        if route.upstream.kind == "tool":
            attrs["gen_ai.tool.name"] = self.request.operation or upstream
            call_id = self.request.labels.get("gen_ai.tool.call.id")
            if call_id:
                attrs["gen_ai.tool.call.id"] = call_id
        else:
            attrs["gen_ai.request.model"] = self.model
        if address:
            attrs.update({"server.address": address, "server.port": port})
        if self.request.run_id:
            attrs["gen_ai.conversation.id"] = self.request.run_id
        if self.t.capture_content and self.request.body is not None:
            attrs["gen_ai.input.messages"] = self.t.redact(_messages(self.request.body))
        span = self.t.tracer.start_span(self._attempt_name(route.upstream), kind=SpanKind.CLIENT,
                                        attributes=attrs)  # fmt: skip
        return (span, time.perf_counter(), upstream)

    def attempt_end(self, token: Any, response: UpstreamResponse | None, exc: Any) -> None:
        span, started, upstream = token
        self.upstream_s += time.perf_counter() - started
        outcome = "ok" if exc is None else "error"
        self.t.metrics.attempts.labels(upstream, outcome).inc()
        if response is not None:
            self._response_attributes(span, response)
        if exc is not None:
            error_type = _error_type(exc)
            span.set_attribute("error.type", error_type)
            span.set_status(Status(StatusCode.ERROR, error_type))
        span.end()

    def _response_attributes(self, span: Any, response: UpstreamResponse) -> None:
        usage = response.usage
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
        if not self.t.tracing.enabled or self.route.upstream.kind == "tool":
            return
        try:
            body = orjson.loads(response.payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(body, dict):
            for attr, key in (("gen_ai.response.model", "model"), ("gen_ai.response.id", "id")):
                if isinstance(body.get(key), str):
                    span.set_attribute(attr, body[key])
            reasons = [c.get("finish_reason") for c in body.get("choices") or ()
                       if isinstance(c, dict) and c.get("finish_reason")]  # fmt: skip
            if reasons:
                span.set_attribute("gen_ai.response.finish_reasons", reasons)
            if self.t.capture_content:
                choices = orjson.dumps(body.get("choices") or []).decode()
                span.set_attribute("gen_ai.output.messages", self.t.redact(choices))

    def first_chunk(self) -> None:
        elapsed = time.perf_counter() - self.started
        self.t.metrics.time_to_first_chunk.labels(*self._genai_labels()).observe(elapsed)

    def event(self, name: str, upstream: str, **attributes: Any) -> None:
        self.span.add_event(name, {"tether.upstream": upstream, **attributes})
        metric = POLICY_METRICS.get(name)
        if metric is not None:
            getattr(self.t.metrics, metric).labels(upstream).inc()
        elif name == "retry.scheduled":
            self.t.metrics.retries.labels(upstream, attributes.get("reason", "")).inc()
        elif name == "rate_limit.wait":
            self.t.metrics.rate_limit_wait.labels(upstream).observe(attributes["delay_s"])
        elif name == "fallback":
            self.t.metrics.fallbacks.labels(upstream, attributes.get("reason", "")).inc()

    def _genai_labels(self) -> tuple[str, str, str, str]:
        m = self.t.metrics
        provider = PROVIDERS.get(self.route.upstream.type, self.route.upstream.type)
        model = m.cap_model(self.route.name, self.model)
        return self.operation, provider, model, self.route.name

    def finish(self, *, answered_by: str, usage: Usage | None, exc: BaseException | None,
               replayed: bool = False) -> None:  # fmt: skip
        """Record the call's outcome, its metrics and its log line, and end its span (once)."""
        if self._finished:
            return
        self._finished = True
        try:
            self._record(answered_by, usage, exc, replayed)
        finally:
            otel_context.detach(self._token)
            self.span.end()

    def _record(self, answered_by: str, usage: Usage | None, exc: Any, replayed: bool) -> None:
        m, elapsed = self.t.metrics, time.perf_counter() - self.started
        error_type = _error_type(exc) if exc is not None else ""
        outcome = _outcome(exc, replayed)
        operation = m.cap_operation(self.route.name, self.request.operation or "-")
        m.calls.labels(self.route.name, self.route.upstream.kind, operation, outcome,
                       error_type).inc()  # fmt: skip
        exemplar = self._exemplar()
        labels = self._genai_labels()
        if not replayed:
            m.operation_duration.labels(*labels, error_type).observe(elapsed, exemplar)
            m.overhead.labels(self.route.name, self.route.upstream.kind).observe(
                max(0.0, elapsed - self.upstream_s), exemplar
            )
        if usage is not None and not replayed:
            self._usage(labels, usage)
        self.span.set_attribute("tether.replayed", replayed)
        if answered_by and answered_by != self.route.name:
            self.span.set_attribute("tether.fallback_used", answered_by)
        if exc is not None:
            self.span.set_attribute("error.type", error_type)
            self.span.set_status(Status(StatusCode.ERROR, error_type))
        if self.t.log_calls:
            self._log(outcome, error_type, elapsed, replayed, answered_by)

    def _usage(self, labels: tuple[str, str, str, str], usage: Usage) -> None:
        m = self.t.metrics
        m.token_usage.labels(*labels, "input").observe(usage.input_tokens)
        m.token_usage.labels(*labels, "output").observe(usage.output_tokens)
        cost = self.t.cost(self.model, usage)
        if cost:
            m.cost.labels(self.route.name, labels[2]).inc(cost)

    def _exemplar(self) -> dict[str, str] | None:
        context = self.span.get_span_context()
        return {"trace_id": format(context.trace_id, "032x")} if context.is_valid else None

    def _log(self, outcome: str, error_type: str, elapsed: float, replayed: bool,
             answered_by: str) -> None:  # fmt: skip
        fields = {
            "upstream": self.route.name, "kind": self.route.upstream.kind,
            "operation": self.request.operation, "outcome": outcome, "error_type": error_type,
            "latency_ms": round(elapsed * 1000, 3),
            "overhead_ms": round(max(0.0, elapsed - self.upstream_s) * 1000, 3),
            "replayed": replayed, "answered_by": answered_by,
        }  # fmt: skip
        log.info("call finished", extra={"fields": fields})


def _messages(body: Any) -> str:
    if isinstance(body, dict) and "messages" in body:
        return orjson.dumps(body["messages"]).decode()
    return orjson.dumps(body).decode()


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, errors.SidecarError):
        return status.classify(exc)[1].lower()
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"  # the caller gave up (its deadline, or it went away)
    return type(exc).__name__


def _outcome(exc: BaseException | None, replayed: bool) -> str:
    if replayed:
        return "replayed"
    if exc is None:
        return "ok"
    return "refused" if isinstance(exc, errors.PolicyError) else "error"
