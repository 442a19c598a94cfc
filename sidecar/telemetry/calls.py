"""Per-call telemetry: the sidecar's span, a CLIENT span per upstream attempt, metrics, logs.

The pipeline reports what happens to a call through a `CallObserver` (attempts, retries,
waits, refusals, fallbacks, journal replays); `TracedCall` turns that into OpenTelemetry
spans and events following the GenAI semantic conventions, and into the metrics of
`sidecar.telemetry.metrics`. With tracing off the spans are no-ops and only metrics are
recorded. Prompt and completion text reach spans only when content capture is on, redacted
of every configured secret; API keys are never recorded.

Telemetry never fails a call: every entry point catches its own errors (logged at debug
level, at most once per `QUIET_WINDOW_S` per entry point) and always ends the spans it
started.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from sidecar import errors, status
from sidecar.telemetry.logging import current_run
from sidecar.upstreams.base import UpstreamRequest, UpstreamResponse, Usage

log = logging.getLogger("tether.sidecar.calls")

PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "mock": "tether.mock",
             "http": "tether.http", "guarded": "tether.guarded"}  # fmt: skip
# Operations named as the GenAI conventions name them (Anthropic's messages are chat).
GENAI_OPERATIONS = {"messages": "chat"}
POLICY_METRICS = {
    "breaker.rejected": "breaker_rejections",
    "rate_limit.rejected": "rate_limit_rejections",
    "bulkhead.rejected": "bulkhead_rejections",
    "retry.budget_exhausted": "retry_budget_exhausted",
    "journal.replay": "journal_replays",
    "journal.in_doubt": "journal_in_doubt",
    "journal.too_large": "journal_too_large",
}
QUIET_WINDOW_S = 10.0
NO_SPAN = trace.INVALID_SPAN


class _Quiet:
    """Logs a telemetry failure at debug level, at most once per window per entry point,
    with the count of those not logged in between."""

    def __init__(self, window_s: float = QUIET_WINDOW_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._next: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def __call__(self, where: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next.get(where, 0.0):
                self._skipped[where] = self._skipped.get(where, 0) + 1
                return
            self._next[where] = now + self.window_s
            skipped = self._skipped.pop(where, 0)
        log.debug("telemetry: %s failed, the call is not affected (%d more since the last "
                  "such line)", where, skipped, exc_info=True)  # fmt: skip


quiet = _Quiet()


class CallObserver:
    """What the pipeline reports about a call; this base records nothing."""

    def attempt_start(self, upstream: str, attempt: int) -> Any:
        return None

    def attempt_end(self, token: Any, response: UpstreamResponse | None, exc: Any) -> None:
        """An attempt ended with `response` or the exception `exc`."""

    def first_chunk(self) -> None:
        """The first chunk of a streamed answer arrived."""

    def response_chunk(self, data: bytes) -> None:
        """A chunk of the streamed answer (the JSON of one event), before `attempt_end`."""

    def event(self, name: str, upstream: str, **attributes: Any) -> None:
        """A policy did something: retry scheduled, wait, refusal, fallback, replay."""

    def add_upstream_time(self, seconds: float) -> None:
        """Time spent in the upstream outside `attempt_start`/`attempt_end`."""

    def exclude(self, seconds: float) -> None:
        """Time that is neither the upstream's nor the sidecar's work (a backoff sleep)."""


NULL_OBSERVER = CallObserver()


def model_of(body: Any) -> str:
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) and model else "unknown"


@functools.lru_cache(maxsize=256)
def server_of(url: str | None) -> tuple[str, int]:
    if not url:
        return "", 0
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.hostname or "", port


class _StreamAnswer:
    """What the chunks of a streamed answer say about it: id, model, finish reasons."""

    __slots__ = ("id", "model", "reasons")

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.reasons: list[str] = []

    def feed(self, data: bytes) -> None:
        if data.startswith(b'{"type"'):  # Anthropic's events
            self._feed_anthropic(data)
            return
        want_id = not self.id and b'"id"' in data
        if not want_id and not _has_finish_reason(data):
            return  # most chunks: no JSON parsing
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(body, dict):
            return
        if want_id:
            self.id, self.model = _text(body.get("id")), _text(body.get("model"))
        self.reasons.extend(_finish_reasons(body.get("choices")))

    def _feed_anthropic(self, data: bytes) -> None:
        """`message_start` names the message and model, `message_delta` the stop reason;
        the text deltas in between are not parsed."""
        start = not self.id and data.startswith(b'{"type":"message_start"')
        if not start and not data.startswith(b'{"type":"message_delta"'):
            return
        try:
            body = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        message = body.get("message") if start else body.get("delta")
        if not isinstance(message, dict):
            return
        if start:
            self.id, self.model = _text(message.get("id")), _text(message.get("model"))
        elif reason := _text(message.get("stop_reason")):
            self.reasons.append(reason)

    def apply(self, attrs: dict[str, Any]) -> None:
        """Add what the chunks said to a span's attributes."""
        if self.id:
            attrs["gen_ai.response.id"] = self.id
        if self.model:
            attrs["gen_ai.response.model"] = self.model
        if self.reasons:
            attrs["gen_ai.response.finish_reasons"] = self.reasons


def _has_finish_reason(data: bytes) -> bool:
    """Whether some `finish_reason` in this JSON is not null (without parsing it)."""
    found = data.count(b'"finish_reason"')
    if not found:
        return False
    return found > data.count(b'"finish_reason":null') + data.count(b'"finish_reason": null')


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _finish_reasons(choices: Any) -> list[str]:
    if not isinstance(choices, list):
        return []
    reasons = []
    for choice in choices:
        reason = choice.get("finish_reason") if isinstance(choice, dict) else None
        if isinstance(reason, str) and reason:
            reasons.append(reason)
    return reasons


class TracedCall(CallObserver):
    """Spans and metrics of one proxied call.

    `started` (a `time.perf_counter()` value) is when the sidecar began working on the call,
    when that was before this object existed. With `attach=False` the call's span is not made
    the current one (for a guarded call, begun and ended in different RPCs); nothing then
    touches the context variables.
    """

    def __init__(self, telemetry: Any, route: Any, request: UpstreamRequest, *, rpc: str,
                 stream: bool, metadata: Any, started: float | None = None,
                 attach: bool = True) -> None:  # fmt: skip
        self.t = telemetry
        self.route = route
        self.request = request
        self.stream = stream
        self.started = time.perf_counter() if started is None else started
        self.upstream_s = 0.0
        self.excluded_s = 0.0
        self.span: Any = NO_SPAN
        self._finished = False
        self._recording = False  # the call's span records (tracing on, sampled)
        self._sampled = False  # ... and will be exported: its trace id may be an exemplar
        self._token: Any = None
        self._run_token: Any = None
        self._answer: _StreamAnswer | None = None
        self._labels: tuple[str, str, str, str] | None = None
        self.model = "unknown"  # what the caller asked for
        self.response_model = ""  # what the provider said answered (when a span read it)
        self.operation = GENAI_OPERATIONS.get(request.operation, request.operation)
        try:
            self.model = model_of(request.body)
            if route.upstream.kind == "tool":
                self.operation = "execute_tool"
            self._start(rpc, metadata, attach)
        except Exception:
            quiet("call start")

    def _start(self, rpc: str, metadata: Any, attach: bool) -> None:
        tracing = self.t.tracing.enabled
        parent = propagate.extract(dict(metadata)) if metadata else None
        self.span = self.t.tracer.start_span(
            f"tether.{rpc}", context=parent, kind=SpanKind.SERVER,
            attributes=self._call_attributes() if tracing else None,
        )  # fmt: skip
        context = self.span.get_span_context()
        self._recording = self.span.is_recording()
        self._sampled = bool(tracing and context.is_valid and context.trace_flags.sampled)
        if not attach:
            return
        if context.is_valid:
            self._token = otel_context.attach(trace.set_span_in_context(self.span))
        if self.request.run_id:
            self._run_token = current_run.set(self.request.run_id)

    def _call_attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "tether.upstream": self.route.name,
            "gen_ai.operation.name": self.operation,
            "gen_ai.request.stream": self.stream,
        }
        if self.route.upstream.kind == "model":
            attrs["gen_ai.request.model"] = self.model
        if self.request.run_id:
            attrs["gen_ai.conversation.id"] = self.request.run_id
        if self.request.idempotency_key:
            attrs["tether.idempotency_key"] = self.request.idempotency_key
        return attrs

    def _attempt_name(self, route: Any) -> str:
        if route.upstream.kind == "tool":
            return f"execute_tool {self.request.operation or route.upstream.name}"
        return f"{self.operation or 'chat'} {self._sent_model(route)}"

    # -- attempts ----------------------------------------------------------------------------

    def attempt_start(self, upstream: str, attempt: int) -> Any:
        span = NO_SPAN
        self._answer = None
        if self._recording:
            try:
                span = self._attempt_span(upstream, attempt)
            except Exception:
                quiet("attempt_start")
        return (span, time.perf_counter(), upstream)

    def _attempt_span(self, upstream: str, attempt: int) -> Any:
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
            attrs["gen_ai.request.model"] = self._sent_model(route)
        if address:
            attrs.update({"server.address": address, "server.port": port})
        if self.request.run_id:
            attrs["gen_ai.conversation.id"] = self.request.run_id
        if self.t.capture_content and self.request.body is not None:
            attrs["gen_ai.input.messages"] = self.t.redact(_messages(self.request.body))
        # The call's span is the parent even when it is not the current one (attach=False).
        parent = trace.set_span_in_context(self.span)
        return self.t.tracer.start_span(self._attempt_name(route), context=parent,
                                        kind=SpanKind.CLIENT, attributes=attrs)  # fmt: skip

    def _sent_model(self, route: Any) -> str:
        """The model a route asks its provider for: its own, else the caller's."""
        return getattr(route, "model", None) or self.model

    def attempt_end(self, token: Any, response: UpstreamResponse | None, exc: Any) -> None:
        span = None
        try:
            span, started, upstream = token
            self.upstream_s += time.perf_counter() - started
            self.t.metrics.attempts_of(upstream, "ok" if exc is None else "error").inc()
            body = response.body if response is not None else None
            if body is not None and isinstance(model := body.get("model"), str):
                self.response_model = model  # what answered, for its price, traced or not
            if span.is_recording():
                self._attempt_attributes(span, upstream, response, exc)
        except Exception:
            quiet("attempt_end")
        finally:
            self._answer = None
            if span is not None:
                try:
                    span.end()
                except Exception:
                    quiet("attempt_end")

    def _attempt_attributes(self, span: Any, upstream: str, response: UpstreamResponse | None,
                            exc: Any) -> None:  # fmt: skip
        attrs: dict[str, Any] = {}
        if response is not None:
            self._response_attributes(attrs, upstream, response)
        if self._answer is not None:
            self._answer.apply(attrs)
            self.response_model = self._answer.model or self.response_model
        if exc is not None:
            error_type = _error_type(exc)
            attrs["error.type"] = error_type
            span.set_status(Status(StatusCode.ERROR, error_type))
        if attrs:
            span.set_attributes(attrs)  # at once: one lock, not one per attribute

    def _response_attributes(self, attrs: dict[str, Any], upstream: str,
                             response: UpstreamResponse) -> None:  # fmt: skip
        usage = response.usage
        if usage is not None:
            attrs["gen_ai.usage.input_tokens"] = usage.input_tokens
            attrs["gen_ai.usage.output_tokens"] = usage.output_tokens
        route = self.t.routes.get(upstream, self.route)
        if route.upstream.kind == "tool" or not response.payload:
            return
        body = response.body  # parsed by the adapter already, else parsed here
        if body is None:
            try:
                body = orjson.loads(response.payload)
            except orjson.JSONDecodeError:
                return
        if not isinstance(body, dict):
            return
        for attr, key in (("gen_ai.response.model", "model"), ("gen_ai.response.id", "id")):
            value = body.get(key)
            if isinstance(value, str) and value:
                attrs[attr] = value
        self.response_model = attrs.get("gen_ai.response.model", "")
        choices = body.get("choices")
        reasons = _finish_reasons(choices)
        if not reasons and isinstance(stop := body.get("stop_reason"), str) and stop:
            reasons = [stop]  # Anthropic's message
        if reasons:
            attrs["gen_ai.response.finish_reasons"] = reasons
        if self.t.capture_content and isinstance(choices, list):
            attrs["gen_ai.output.messages"] = self.t.redact(orjson.dumps(choices).decode())

    def response_chunk(self, data: bytes) -> None:
        if not self._recording:
            return
        try:
            if self._answer is None:
                self._answer = _StreamAnswer()
            self._answer.feed(data)
        except Exception:
            quiet("response_chunk")

    def first_chunk(self) -> None:
        try:
            elapsed = time.perf_counter() - self.started
            self.t.metrics.first_chunk_of(*self._genai_labels()).observe(elapsed)
        except Exception:
            quiet("first_chunk")

    def add_upstream_time(self, seconds: float) -> None:
        try:
            self.upstream_s += max(0.0, float(seconds))
        except Exception:
            quiet("add_upstream_time")

    def exclude(self, seconds: float) -> None:
        try:
            self.excluded_s += max(0.0, float(seconds))
        except Exception:
            quiet("exclude")

    # -- policies ----------------------------------------------------------------------------

    def event(self, name: str, upstream: str, **attributes: Any) -> None:
        try:
            if self._recording:
                self.span.add_event(name, {"tether.upstream": upstream, **attributes})
            self._count(name, upstream, attributes)
        except Exception:
            quiet("event")

    def _count(self, name: str, upstream: str, attributes: dict[str, Any]) -> None:
        m = self.t.metrics
        metric = POLICY_METRICS.get(name)
        if metric is not None:
            getattr(m, metric).labels(upstream).inc()
        elif name == "retry.scheduled":
            m.retries.labels(upstream, attributes.get("reason", "")).inc()
        elif name == "rate_limit.wait":
            m.rate_limit_wait.labels(upstream).observe(attributes["delay_s"])
        elif name == "fallback":
            m.fallbacks.labels(upstream, attributes.get("reason", "")).inc()
        elif name == "stream.cut":
            m.streams_cut.labels(upstream, attributes.get("reason", "")).inc()
        elif name == "stream.recovery":
            m.stream_recoveries.labels(upstream, attributes.get("outcome", "")).inc()

    def _genai_labels(self) -> tuple[str, str, str, str]:
        if self._labels is None:
            m, route = self.t.metrics, self.route
            provider = PROVIDERS.get(route.upstream.type, route.upstream.type)
            model = m.cap_model(route.name, self.model)
            self._labels = (self.operation, provider, model, route.name)
        return self._labels

    # -- the end -----------------------------------------------------------------------------

    def overhead(self, elapsed: float) -> float:
        """The sidecar's own share of `elapsed`: without upstream time and backoff sleeps."""
        return max(0.0, elapsed - self.upstream_s - self.excluded_s)

    def finish(self, *, answered_by: str, usage: Usage | None, exc: BaseException | None,
               replayed: bool = False) -> None:  # fmt: skip
        """Record the call's outcome, its metrics and its log line, and end its span (once)."""
        if self._finished:
            return
        self._finished = True
        try:
            self._record(answered_by, usage, exc, replayed)
        except Exception:
            quiet("finish")
        finally:
            self._detach()
            try:
                self.span.end()
            except Exception:
                quiet("finish")

    def _detach(self) -> None:
        if self._token is not None:
            token, self._token = self._token, None
            try:
                otel_context.detach(token)
            except Exception:
                quiet("finish")
        if self._run_token is not None:
            token, self._run_token = self._run_token, None
            try:
                current_run.reset(token)
            except Exception:  # finished in another context than the one it began in
                quiet("finish")

    def _record(self, answered_by: str, usage: Usage | None, exc: Any, replayed: bool) -> None:
        m, route = self.t.metrics, self.route
        elapsed = time.perf_counter() - self.started
        error_type = _error_type(exc) if exc is not None else ""
        outcome = _outcome(exc, replayed)
        kind = route.upstream.kind
        operation = m.cap_operation(route.name, self.request.operation or "-")
        m.calls_of(route.name, kind, operation, outcome, error_type).inc()
        answered = self.t.routes.get(answered_by) if answered_by and exc is None else None
        answered_model = self._sent_model(answered) if answered is not None else ""
        if not replayed:
            exemplar = self._exemplar() if self._sampled else None
            labels = self._genai_labels()
            response_model = m.cap_model(route.name, answered_model) if answered_model else ""
            m.duration_of(*labels, response_model, error_type).observe(elapsed, exemplar)
            m.overhead_of(route.name, kind).observe(self.overhead(elapsed), exemplar)
            if usage is not None:
                self._usage(labels, response_model, usage, answered_model)
        if self._recording:
            attrs: dict[str, Any] = {"tether.replayed": replayed}
            if kind == "model" and (self.response_model or answered_model):
                attrs["gen_ai.response.model"] = self.response_model or answered_model
            if answered_by and answered_by != route.name:
                attrs["tether.fallback_used"] = answered_by
            if exc is not None:
                attrs["error.type"] = error_type
                self.span.set_status(Status(StatusCode.ERROR, error_type))
            self.span.set_attributes(attrs)
        if self.t.log_calls:
            self._log(outcome, error_type, elapsed, replayed, answered_by)

    def _usage(self, labels: tuple[str, str, str, str], response_model: str, usage: Usage,
               answered_model: str) -> None:  # fmt: skip
        """Token histograms, and the cost at the price of what answered: the snapshot the
        provider named, else the model it was asked for, else the caller's."""
        m = self.t.metrics
        m.tokens_of(*labels, response_model, "input").observe(usage.input_tokens)
        m.tokens_of(*labels, response_model, "output").observe(usage.output_tokens)
        cost = self.t.cost(usage, self.response_model, answered_model, self.model)
        if cost:
            m.cost_of(self.route.name, labels[2], response_model).inc(cost)

    def _exemplar(self) -> dict[str, str]:
        return {"trace_id": format(self.span.get_span_context().trace_id, "032x")}

    def _ids(self) -> dict[str, str]:
        """The call's own trace, span and run, whatever the current context is."""
        ids = {}
        context = self.span.get_span_context()
        if context.is_valid:
            ids["trace_id"] = format(context.trace_id, "032x")
            ids["span_id"] = format(context.span_id, "016x")
        if self.request.run_id:
            ids["run_id"] = self.request.run_id
        return ids

    def _log(self, outcome: str, error_type: str, elapsed: float, replayed: bool,
             answered_by: str) -> None:  # fmt: skip
        fields = {
            "event": "call",  # one line per call: never rate-limited (see logging.RateLimit)
            "upstream": self.route.name, "kind": self.route.upstream.kind,
            "operation": self.request.operation, "outcome": outcome, "error_type": error_type,
            "latency_ms": round(elapsed * 1000, 3),
            "overhead_ms": round(self.overhead(elapsed) * 1000, 3),
            "replayed": replayed, "answered_by": answered_by,
        }  # fmt: skip
        log.info("call finished", extra={"fields": fields, "ids": self._ids()})


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
