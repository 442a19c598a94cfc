"""SDK instrumentation without a sidecar: tracing set-up, runs, agent spans, payloads."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tether
from tether import _instrument
from tether._tools import arguments_payload, encode_result

OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
             "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
             "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED",
             "TETHER_RUN_ID")  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No OTEL_* settings from outside; no tracing set up before or after each test."""
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    _instrument._reset_for_tests()
    yield
    _instrument._reset_for_tests()


@pytest.fixture
def memory() -> InMemorySpanExporter:
    """Tracing set up by `tether.instrument`, exporting to memory."""
    exporter = InMemorySpanExporter()
    tether.instrument("unit-agent", exporter=exporter)
    return exporter


def finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    handle = tether.instrument()
    assert handle.force_flush(5)
    return list(exporter.get_finished_spans())


def attributes(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


# -- instrument ------------------------------------------------------------------------------


def test_instrument_is_idempotent() -> None:
    """A second call returns the same set-up and adds no processor: each span is exported
    once, to the first call's exporter."""
    first, second = InMemorySpanExporter(), InMemorySpanExporter()
    handle = tether.instrument("svc", exporter=first)
    assert tether.instrument("other", exporter=second) is handle
    with tether.agent("a"):
        pass
    assert handle.force_flush(5)
    assert [s.name for s in first.get_finished_spans()] == ["invoke_agent a"]
    assert second.get_finished_spans() == ()
    assert first.get_finished_spans()[0].resource.attributes["service.name"] == "svc"


def test_instrument_again_after_shutdown() -> None:
    """After `shutdown` (or the end of its `with` block) a new call exports anew; the old
    exporter gets nothing more."""
    old, new = InMemorySpanExporter(), InMemorySpanExporter()
    with tether.instrument("svc", exporter=old) as handle:
        pass
    assert handle.closed
    again = tether.instrument("svc", exporter=new)
    assert again is not handle
    with tether.agent("b"):
        pass
    assert again.force_flush(5)
    assert old.get_finished_spans() == () and len(new.get_finished_spans()) == 1


class StuckExporter(SpanExporter):
    """An exporter whose export hangs (a collector that never answers) until shut down."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.released = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.started.set()
        self.released.wait(30)
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self.released.set()


def test_shutdown_is_bounded_with_a_stuck_collector() -> None:
    """`shutdown` waits about its timeout for an export in progress, not the SDK's 30 s."""
    stuck = StuckExporter()
    handle = tether.instrument("svc", exporter=stuck)
    with tether.agent("slow"):
        pass
    started = time.monotonic()
    handle.shutdown(timeout_s=0.3)
    assert stuck.started.is_set() and time.monotonic() - started < 2


def test_service_name_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """service.name: argument, else OTEL_SERVICE_NAME, else tether-agent."""
    assert _instrument.service_resource(None).attributes["service.name"] == "tether-agent"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    assert _instrument.service_resource(None).attributes["service.name"] == "from-env"
    assert _instrument.service_resource("arg").attributes["service.name"] == "arg"


def test_disabled_sdk_sets_nothing_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTEL_SDK_DISABLED=true: no provider is installed, spans do not record."""
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    handle = tether.instrument("svc", exporter=InMemorySpanExporter())
    assert handle.provider is None and handle.force_flush()
    with tether.agent("quiet"):
        assert not trace.get_current_span().is_recording()


def test_no_endpoint_no_exporter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an endpoint nothing is exported (as the sidecar's `auto`), but spans are
    made, so the trace context still reaches the sidecar."""
    handle = tether.instrument("svc")
    assert handle.processor is None and handle.provider is not None
    with tether.agent("local"):
        assert trace.get_current_span().get_span_context().is_valid


def test_exporter_follows_protocol_and_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC by default; http/protobuf from the argument or the (traces-specific first)
    variables, with /v1/traces added to an endpoint without a path; others refused."""
    assert _instrument.otlp_exporter(None, None) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    assert isinstance(_instrument.otlp_exporter(None, None), GrpcExporter)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    assert isinstance(_instrument.otlp_exporter(None, None), HttpExporter)
    assert isinstance(_instrument.otlp_exporter(None, "grpc"), GrpcExporter)
    assert _instrument.http_traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert _instrument.http_traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert _instrument.http_traces_url("http://c/otlp/traces") == "http://c/otlp/traces"
    with pytest.raises(ValueError, match="http/json"):
        _instrument.otlp_exporter("http://c:4318", "http/json")


def test_existing_provider_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that set up its own TracerProvider keeps it: instrument adds no OTLP
    exporter, and the decorators' spans go to the process's own pipeline."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    own = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(own))
    trace.set_tracer_provider(provider)
    handle = tether.instrument("ignored")
    assert handle.provider is provider and handle.processor is None
    with tether.agent("theirs"):
        pass
    assert [s.name for s in own.get_finished_spans()] == ["invoke_agent theirs"]


# -- runs ------------------------------------------------------------------------------------


def test_run_id_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new run's id: the argument, else $TETHER_RUN_ID, else a fresh uuid."""
    with tether.agent("a", run_id="given") as run:
        assert run.run_id == "given"
    with tether.agent("a") as one, tether.run(run_id="other") as two:
        assert len(uuid.UUID(one.run_id).hex) == 32 and two.run_id == "other"
    with tether.agent("a") as again:
        assert again.run_id != one.run_id
    monkeypatch.setenv("TETHER_RUN_ID", "from-env")
    with tether.agent("a") as run:
        assert run.run_id == "from-env"


def test_run_id_from_the_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """A callable run_id gets the agent's arguments; None from it falls back to the env."""
    monkeypatch.setenv("TETHER_RUN_ID", "env-run")

    @tether.agent("job", run_id=lambda job, **_: job and f"job-{job}")
    def work(job: int | None, *, extra: str = "") -> str | None:
        run = tether.current_run()
        return run.run_id if run else None

    assert (work(7), work(None, extra="x")) == ("job-7", "env-run")


def test_nested_agents_join_the_run_and_share_steps() -> None:
    """A sub-agent joins the current run (one step counter); naming another run nests a
    new one, and the outer run is current again afterwards."""
    assert tether.current_run() is None
    with tether.agent("outer", run_id="r") as outer:
        assert outer.next_key() == "r:1"
        with tether.agent("inner") as inner:
            assert inner is outer and inner.next_key() == "r:2"
        with tether.agent("other", run_id="s") as other:
            assert other.run_id == "s" and other.next_key() == "s:1"
            assert tether.current_run() is other
        with tether.run(run_id="r") as same:
            assert same is outer
        assert tether.current_run() is outer and outer.next_key() == "r:3"
    assert tether.current_run() is None


def test_run_on_a_given_client() -> None:
    """`tether.run(client, id)` makes a run of that client current and returns it."""
    with tether.Client("unix:/nonexistent.sock") as client, tether.run(client, "c-1") as run:
        assert isinstance(run, tether.Run) and run.client is client
        assert tether.current_run() is run
    assert tether.current_run() is None


async def test_async_agent_without_client_owns_an_async_client() -> None:
    """An async agent with no client and no current run makes an AsyncClient of its own;
    concurrent tasks each see their own run."""

    @tether.agent("worker", run_id=lambda n: f"w-{n}")
    async def worker(n: int) -> tuple[str, bool]:
        await asyncio.sleep(0.01)
        run = tether.current_run()
        assert run is not None
        return run.run_id, isinstance(run, tether.AsyncRun)

    assert await asyncio.gather(worker(1), worker(2)) == [("w-1", True), ("w-2", True)]
    async with tether.run() as run:
        assert isinstance(run, tether.AsyncRun)


# -- agent spans -----------------------------------------------------------------------------


def test_agent_span_names_attributes_and_parents(memory: InMemorySpanExporter) -> None:
    """`invoke_agent {name}` with GenAI attributes; a sub-agent's span is its child."""

    @tether.agent("planner", run_id="p-1", description="plans trips", agent_id="v2")
    def plan() -> str:
        with tether.agent("critic"):
            return "done"

    assert plan() == "done"
    critic, planner = finished(memory)
    assert planner.name == "invoke_agent planner" and critic.name == "invoke_agent critic"
    assert attributes(planner) == {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner",
        "gen_ai.agent.description": "plans trips", "gen_ai.agent.id": "v2",
        "gen_ai.conversation.id": "p-1",
    }  # fmt: skip
    assert critic.parent is not None and planner.context is not None
    assert critic.parent.span_id == planner.context.span_id
    assert planner.kind is trace.SpanKind.INTERNAL


async def test_agent_errors_mark_the_span(memory: InMemorySpanExporter) -> None:
    """An exception leaving an agent (sync, async or a block) sets error.type and an error
    status, and still propagates."""

    @tether.agent
    def sync_agent() -> None:
        raise KeyError("k")

    @tether.agent("async-agent")
    async def async_agent() -> None:
        raise ValueError("v")

    with pytest.raises(KeyError):
        sync_agent()
    with pytest.raises(ValueError):
        await async_agent()
    with pytest.raises(LookupError):
        async with tether.agent("block"):
            raise LookupError("l")
    spans = {s.name: s for s in finished(memory)}
    for name, kind in (("sync_agent", "KeyError"), ("async-agent", "ValueError"),
                       ("block", "LookupError")):  # fmt: skip
        span = spans[f"invoke_agent {name}"]
        assert attributes(span)["error.type"] == kind
        assert span.status.status_code is trace.StatusCode.ERROR


def test_decorators_keep_the_function() -> None:
    """Decorated functions keep their name and docstring; generator functions are refused."""

    @tether.tool("t")
    def lookup() -> None:
        """Looks up."""

    assert (lookup.__name__, lookup.__doc__) == ("lookup", "Looks up.")
    with pytest.raises(TypeError, match="generator"):

        @tether.tool
        def gen() -> Iterator[int]:
            yield 1

    with pytest.raises(TypeError, match="needs a name"), tether.agent():
        pass


# -- payloads --------------------------------------------------------------------------------


def test_arguments_payload_is_deterministic() -> None:
    """Arguments hash the same whatever the keyword order; values JSON cannot express
    count by type name; no arguments, no payload."""
    assert arguments_payload((), {}) == b""
    one = arguments_payload((1, "a"), {"b": 2, "a": [1]})
    assert one == arguments_payload((1, "a"), {"a": [1], "b": 2})
    assert orjson.loads(one) == {"args": [1, "a"], "kwargs": {"a": [1], "b": 2}}
    opaque = orjson.loads(arguments_payload((object(), {1, 2}), {"n": 2**70}))
    assert opaque == {"args": ["<object>", "<set>"], "kwargs": {"n": "<int>"}}


def test_results_are_json_or_a_clear_type_error() -> None:
    """A result is returned as the journal will replay it; a non-JSON one is a TypeError
    naming the tool and the type."""
    assert encode_result("t", ("a", 1)) == (["a", 1], b'["a",1]')
    assert encode_result("t", None) == (None, b"null")
    with pytest.raises(TypeError, match=r"tool 'fetch' returned a bytes that is not JSON"):
        encode_result("fetch", b"raw")
    with pytest.raises(TypeError, match=r"tool 'deep' returned a dict .*set"):
        encode_result("deep", {"k": {1}})
