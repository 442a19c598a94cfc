"""Per-call telemetry (`TracedCall`): it never fails a call and always ends its spans, whatever
the upstream answers; exemplars only for exported traces; `started`, `attach=False`,
upstream time and exclusions; stream answers described on the attempt's span."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar import errors
from sidecar.config import parse_config
from sidecar.pipeline import Pipeline
from sidecar.telemetry.calls import TracedCall
from sidecar.telemetry.hub import Telemetry
from sidecar.telemetry.logging import current_run
from sidecar.upstreams.base import UpstreamRequest, UpstreamResponse, Usage
from sidecar.upstreams.registry import build_upstreams

CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]}
REQUEST = UpstreamRequest("chat", orjson.dumps(CHAT), CHAT, "key-1", "run-1")
TRACEPARENT = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),)
DURATION = "gen_ai_client_operation_duration_seconds"


class Sidecar:
    """A Telemetry over the routes of a config with one mock model and one mock tool."""

    def __init__(self, tracing: bool) -> None:
        self.config = parse_config({
            "listen": {"grpc": "unix:/tmp/unused.sock"},
            "upstreams": {"m": {"kind": "model", "type": "mock"},
                          "t": {"kind": "tool", "type": "mock"},
                          "a": {"type": "anthropic", "base_url": "https://llm.example:8443"}},
        })  # fmt: skip
        self.exporter = InMemorySpanExporter()
        self.telemetry = Telemetry(self.config, exporter=self.exporter if tracing else None)
        self.pipeline = Pipeline(self.config, build_upstreams(self.config))
        self.telemetry.watch(self.pipeline.routes)

    def call(self, upstream: str = "m", request: UpstreamRequest = REQUEST, **kw: Any) -> Any:
        options: dict[str, Any] = {"rpc": "Call", "stream": False, "metadata": (), **kw}
        return self.telemetry.call(self.pipeline.routes[upstream], request, **options)

    def spans(self) -> dict[str, ReadableSpan]:
        provider = self.telemetry.tracing.provider
        assert provider is not None
        provider.force_flush()
        return {span.name: span for span in self.exporter.get_finished_spans()}

    def samples(self, family: str, suffix: str) -> list[Any]:
        return [s for f in self.telemetry.metrics.registry.collect() if f.name == family
                for s in f.samples if s.name == family + suffix]  # fmt: skip


@pytest.fixture
def traced() -> Iterator[Sidecar]:
    sidecar = Sidecar(tracing=True)
    yield sidecar
    sidecar.telemetry.shutdown(1.0)


@pytest.fixture
def untraced() -> Sidecar:
    return Sidecar(tracing=False)


def answer(body: Any) -> UpstreamResponse:
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    return UpstreamResponse(payload, usage=Usage(3, 4))


@pytest.mark.parametrize(
    "body",
    [
        {"id": "x", "model": "m", "choices": 5},
        {"id": 5, "model": ["m"], "choices": [1, None, {"finish_reason": 7}]},
        {"choices": {"finish_reason": "stop"}},
        [1, 2, 3],
        b"not json",
        b"",
    ],
)
def test_odd_answers_never_fail_the_call(traced: Sidecar, body: Any) -> None:
    """Whatever the upstream answers, the attempt's telemetry neither raises nor leaves its
    span open; the call's span ends too."""
    call = traced.call()
    token = call.attempt_start("m", 1)
    call.attempt_end(token, answer(body), None)
    call.finish(answered_by="m", usage=Usage(3, 4), exc=None)
    spans = traced.spans()
    attempt = spans["chat gpt-test"]
    assert attempt.end_time is not None and spans["tether.Call"].end_time is not None
    assert attempt.attributes is not None
    assert attempt.attributes["gen_ai.usage.output_tokens"] == 4
    assert "gen_ai.response.finish_reasons" not in attempt.attributes


def test_a_good_answer_is_described(traced: Sidecar) -> None:
    call = traced.call()
    token = call.attempt_start("m", 1)
    body = {"id": "c-1", "model": "gpt-test-2", "choices": [{"finish_reason": "stop"}]}
    call.attempt_end(token, answer(body), None)
    call.finish(answered_by="m", usage=Usage(3, 4), exc=None)
    attrs = traced.spans()["chat gpt-test"].attributes
    assert attrs is not None
    assert attrs["gen_ai.response.id"] == "c-1"
    assert attrs["gen_ai.response.model"] == "gpt-test-2"
    assert attrs["gen_ai.response.finish_reasons"] == ("stop",)
    assert attrs["gen_ai.conversation.id"] == "run-1" and attrs["gen_ai.request.stream"] is False


class Broken:
    """Stands in for any metric or helper: every use raises."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("broken")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("broken")


def test_no_entry_point_raises_and_spans_always_end(
    traced: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Metrics that raise, odd tokens, odd events: the call goes on, spans end, the context
    is restored."""
    metrics = traced.telemetry.metrics
    for name in ("attempts_of", "calls_of", "duration_of", "first_chunk_of", "retries"):
        monkeypatch.setattr(metrics, name, Broken())
    before = trace.get_current_span()
    call = traced.call()
    assert trace.get_current_span() is call.span
    token = call.attempt_start("m", 1)
    call.attempt_end(token, answer({"choices": 5}), None)
    call.attempt_end(None, None, None)  # not a token
    call.attempt_end(("span?", "time?", "m"), None, None)
    call.first_chunk()
    call.response_chunk(b'{"id": 1, "choices": [{"finish_reason": {}}]}')
    call.event("retry.scheduled", "m", attempt=1, delay_s=0.1, reason="x")
    call.event("rate_limit.wait", "m")  # no delay_s
    call.add_upstream_time("soon")  # type: ignore[arg-type]
    call.exclude(None)  # type: ignore[arg-type]
    call.finish(answered_by="m", usage=None, exc=None)
    spans = traced.spans()
    assert spans["chat gpt-test"].end_time is not None
    assert spans["tether.Call"].end_time is not None
    assert trace.get_current_span() is before


def test_a_failing_tracer_does_not_fail_the_call(
    traced: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(traced.telemetry, "tracer", Broken())
    call = traced.call()
    token = call.attempt_start("m", 1)
    call.attempt_end(token, answer({}), errors.UpstreamUnavailableError("down", upstream="m"))
    call.finish(answered_by="", usage=None, exc=errors.UpstreamUnavailableError("d", upstream="m"))
    calls = traced.samples("tether_calls", "_total")
    assert [s.labels["outcome"] for s in calls] == ["error"]


def exemplars(sidecar: Sidecar) -> list[Any]:
    return [s.exemplar for s in sidecar.samples(DURATION, "_bucket") if s.exemplar is not None]


def test_exemplars_only_for_exported_traces(
    traced: Sidecar, untraced: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tracing off the no-op span carries the caller's trace id: no exemplar, since no
    such trace is exported by the sidecar. With tracing on and the span sampled, one."""
    untraced.call(metadata=TRACEPARENT).finish(answered_by="m", usage=None, exc=None)
    assert exemplars(untraced) == []
    call = traced.call(metadata=TRACEPARENT)
    call.finish(answered_by="m", usage=None, exc=None)
    (exemplar,) = exemplars(traced)
    assert exemplar.labels["trace_id"] == "0af7651916cd43dd8448eb211c80319c"


def test_no_exemplar_for_a_span_the_sampler_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    sidecar = Sidecar(tracing=True)
    try:
        call = sidecar.call()
        assert not call.span.is_recording() and call.span.get_span_context().is_valid
        call.finish(answered_by="m", usage=None, exc=None)
        assert exemplars(sidecar) == []
    finally:
        sidecar.telemetry.shutdown(1.0)


def test_overhead_is_elapsed_minus_upstream_and_backoff(untraced: Sidecar) -> None:
    """`started` moves the start back; upstream time and exclusions are not overhead."""
    call = untraced.call(started=time.perf_counter() - 2.0)
    call.add_upstream_time(1.0)
    call.exclude(0.9)
    token = call.attempt_start("m", 1)
    call.attempt_end(token, answer({}), None)
    call.finish(answered_by="m", usage=None, exc=None)
    (overhead,) = untraced.samples("tether_overhead_seconds", "_sum")
    (duration,) = untraced.samples(DURATION, "_sum")
    assert duration.value >= 2.0
    assert 0.1 <= overhead.value < 0.15


def test_run_id_and_context_while_a_call_runs(traced: Sidecar) -> None:
    """An attached call is the current span and run until it finishes."""
    assert current_run.get() == ""
    call = traced.call()
    assert current_run.get() == "run-1" and trace.get_current_span() is call.span
    call.finish(answered_by="m", usage=None, exc=None)
    assert current_run.get() == "" and trace.get_current_span() is not call.span


def test_unattached_call_leaves_the_context_alone(traced: Sidecar) -> None:
    """attach=False (a guarded call: begun in one RPC, ended in another) touches no context
    variable; its attempts are still its children."""
    before = trace.get_current_span()
    call = traced.call(attach=False)
    assert trace.get_current_span() is before and current_run.get() == ""
    token = call.attempt_start("m", 1)
    call.attempt_end(token, answer({}), None)
    call.finish(answered_by="m", usage=None, exc=None)
    assert trace.get_current_span() is before and current_run.get() == ""
    spans = traced.spans()
    parent = spans["chat gpt-test"].parent
    assert parent is not None and parent.span_id == spans["tether.Call"].context.span_id


def stream_chunks() -> list[bytes]:
    def chunk(delta: dict[str, Any], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return orjson.dumps({"id": "s-1", "model": "gpt-test-3", "choices": [choice]})

    return [chunk({"role": "assistant"}, None), chunk({"content": "a"}, None),
            chunk({}, "length"), b'{"usage": {"prompt_tokens": 1}}']  # fmt: skip


def test_stream_answer_on_the_attempt_span(traced: Sidecar) -> None:
    call = traced.call(rpc="StreamCall", stream=True)
    token = call.attempt_start("m", 1)
    call.first_chunk()
    for data in stream_chunks():
        call.response_chunk(data)
    call.attempt_end(token, UpstreamResponse(b"", usage=Usage(1, 2)), None)
    call.finish(answered_by="m", usage=Usage(1, 2), exc=None)
    attrs = traced.spans()["chat gpt-test"].attributes
    assert attrs is not None
    assert attrs["gen_ai.response.id"] == "s-1"
    assert attrs["gen_ai.response.model"] == "gpt-test-3"
    assert attrs["gen_ai.response.finish_reasons"] == ("length",)
    assert attrs["gen_ai.request.stream"] is True


MESSAGES = {
    "model": "claude-test",
    "max_tokens": 8,
    "messages": [{"role": "user", "content": "hi"}],
}
ANTHROPIC_EVENTS = [
    {"type": "message_start", "message": {"id": "msg_1", "model": "claude-test-2", "usage": {}}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {}},
    {"type": "message_stop"},
]


def test_anthropic_messages_are_chat_with_their_server(traced: Sidecar) -> None:
    """Anthropic's `messages` is the GenAI `chat` operation; its stream's first and last
    events describe the answer; the attempt names the server it called."""
    request = UpstreamRequest("messages", orjson.dumps(MESSAGES), MESSAGES, "k", "run-1")
    call = traced.call("a", request, rpc="StreamCall", stream=True)
    token = call.attempt_start("a", 1)
    call.first_chunk()
    for event in ANTHROPIC_EVENTS:
        call.response_chunk(orjson.dumps(event))
    call.attempt_end(token, UpstreamResponse(b"", usage=Usage(1, 2)), None)
    call.finish(answered_by="a", usage=Usage(1, 2), exc=None)
    attrs = traced.spans()["chat claude-test"].attributes
    assert attrs is not None
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.provider.name"] == "anthropic"
    assert (attrs["server.address"], attrs["server.port"]) == ("llm.example", 8443)
    assert attrs["gen_ai.response.id"] == "msg_1"
    assert attrs["gen_ai.response.model"] == "claude-test-2"
    assert attrs["gen_ai.response.finish_reasons"] == ("end_turn",)


def test_anthropic_message_stop_reason(traced: Sidecar) -> None:
    request = UpstreamRequest("messages", orjson.dumps(MESSAGES), MESSAGES, "k", "run-1")
    call = traced.call("a", request)
    token = call.attempt_start("a", 1)
    body = {"id": "msg_2", "type": "message", "model": "claude-test", "stop_reason": "max_tokens"}
    call.attempt_end(token, answer(body), None)
    call.finish(answered_by="a", usage=Usage(3, 4), exc=None)
    attrs = traced.spans()["chat claude-test"].attributes
    assert attrs is not None
    assert attrs["gen_ai.response.finish_reasons"] == ("max_tokens",)
    assert attrs["gen_ai.response.id"] == "msg_2"


def test_untraced_calls_build_no_span_and_parse_nothing(
    untraced: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With tracing off: no attempt span, no answer parsing, metrics still recorded."""
    monkeypatch.setattr(orjson, "loads", Broken())
    call = untraced.call(rpc="StreamCall", stream=True)
    token = call.attempt_start("m", 1)
    assert token[0] is trace.INVALID_SPAN
    for data in stream_chunks():
        call.response_chunk(data)
    call.attempt_end(token, answer({"id": "x", "choices": []}), None)
    call.finish(answered_by="m", usage=Usage(1, 2), exc=None)
    assert [s.value for s in untraced.samples("tether_upstream_attempts", "_total")] == [1.0]
    assert [s.value for s in untraced.samples("tether_calls", "_total")] == [1.0]


def test_call_log_line_names_its_own_trace_and_run(
    traced: Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """The one line per call carries the call's ids even when not attached, and the marker
    that exempts it from rate limiting."""
    traced.telemetry.log_calls = True
    call = traced.call(attach=False)
    with caplog.at_level("INFO", logger="tether.sidecar.calls"):
        call.finish(answered_by="m", usage=None, exc=None)
    (record,) = [r for r in caplog.records if r.getMessage() == "call finished"]
    context = call.span.get_span_context()
    ids = {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x"),
           "run_id": "run-1"}  # fmt: skip
    assert getattr(record, "ids", None) == ids
    assert getattr(record, "fields", {})["event"] == "call"


def test_finish_counts_once(untraced: Sidecar) -> None:
    call = untraced.call()
    call.finish(answered_by="m", usage=None, exc=None)
    call.finish(answered_by="m", usage=None, exc=errors.InvalidRequestError("x"))
    assert [s.value for s in untraced.samples("tether_calls", "_total")] == [1.0]
    assert isinstance(call, TracedCall)
