"""The SDK's instrumentation against a real sidecar: decorators, replay, admission, spans,
wrapped openai clients through the real HTTP front, and the instrumented example."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tether
from sidecar.server import SidecarServer
from tests.conftest import ROOT
from tests.integration.conftest import SidecarFactory
from tests.integration.otlp import OtlpReceiver, ReceivedSpan
from tests.integration.support import LoopThread, UpstreamApp, serve_app
from tether import _instrument

HELLO = [{"role": "user", "content": "hi"}]
CHAT = {"model": "mock-gpt", "messages": HELLO}


def guarded(**policies: Any) -> dict[str, Any]:
    return {"kind": "tool", "type": "guarded", "timeout_s": 5, "policies": {"retry": None,
            **policies}}  # fmt: skip


class Crash(BaseException):
    """Stands for the process dying mid-run: nothing after it runs, nothing is reported."""


@dataclass
class AgentSpans:
    handle: tether.Instrumentation
    exporter: InMemorySpanExporter

    def finished(self) -> list[ReadableSpan]:
        assert self.handle.force_flush(5)
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.finished() if s.name == name]


@pytest.fixture
def agent_spans() -> Iterator[AgentSpans]:
    """`tether.instrument` exporting the agent's spans to memory; undone afterwards."""
    exporter = InMemorySpanExporter()
    handle = tether.instrument("agent-under-test", exporter=exporter)
    yield AgentSpans(handle, exporter)
    _instrument._reset_for_tests()


# -- replay ----------------------------------------------------------------------------------


def test_resumed_run_replays_tools_without_running_them(make_sidecar: SidecarFactory) -> None:
    """A run that died after two steps, run again with its run id, gets steps 1-2 from the
    journal without running the tool functions, and executes step 3."""
    server = make_sidecar({"kb": guarded(), "ledger": guarded()})
    ran: Counter[str] = Counter()

    @tether.tool("lookup", upstream="kb")
    def lookup(topic: str) -> dict[str, Any]:
        ran[f"lookup {topic}"] += 1
        return {"topic": topic, "n": len(topic)}

    @tether.tool(upstream="ledger")
    def book(step: int) -> str:
        ran[f"book {step}"] += 1
        return f"booked {step}"

    with tether.Client(server.addresses[0]) as client:

        @tether.agent("planner", run_id="trip-1", client=client)
        def plan(crash_at: int) -> list[Any]:
            out: list[Any] = []
            for step in (1, 2, 3):
                if step == crash_at:
                    raise Crash
                out += [lookup(f"city {step}"), book(step)]
            return out

        with pytest.raises(Crash):
            plan(3)
        assert ran == {"lookup city 1": 1, "book 1": 1, "lookup city 2": 1, "book 2": 1}
        answers = plan(0)
        journal = client.journal("trip-1")
    assert ran == {"lookup city 1": 1, "book 1": 1, "lookup city 2": 1, "book 2": 1,
                   "lookup city 3": 1, "book 3": 1}  # fmt: skip
    assert answers == [{"topic": "city 1", "n": 6}, "booked 1", {"topic": "city 2", "n": 6},
                       "booked 2", {"topic": "city 3", "n": 6}, "booked 3"]  # fmt: skip
    assert [(e.key, e.state, e.replays) for e in journal] == [
        (f"trip-1:{n}", "done", 1 if n <= 4 else 0) for n in range(1, 7)
    ]


async def test_async_tools_replay_on_an_async_client(make_sidecar: SidecarFactory) -> None:
    """Async tools in an async agent on an AsyncClient replay the same way."""
    server = make_sidecar({"kb": guarded()})
    ran: list[int] = []

    @tether.tool("fetch", upstream="kb")
    async def fetch(n: int) -> dict[str, int]:
        await asyncio.sleep(0)
        ran.append(n)
        return {"n": n, "square": n * n}

    async with tether.AsyncClient(server.addresses[0]) as client:

        @tether.agent("fetcher", run_id="async-1", client=client)
        async def gather() -> list[Any]:
            return [await fetch(n) for n in range(3)]

        first, again = await gather(), await gather()
    assert first == again == [{"n": n, "square": n * n} for n in range(3)]
    assert ran == [0, 1, 2]


async def test_mixed_sync_and_async_tools_share_one_run(make_sidecar: SidecarFactory) -> None:
    """A sync tool in an async run (its own blocking client) and an async tool in a sync run
    (guarded from a worker thread) both take steps of the one run, and replay."""
    server = make_sidecar({"kb": guarded()})
    ran: list[str] = []

    @tether.tool(upstream="kb")
    def blocking(x: int) -> int:
        ran.append(f"blocking {x}")
        return x + 1

    @tether.tool(upstream="kb")
    async def awaiting(x: int) -> int:
        ran.append(f"awaiting {x}")
        return x * 2

    async with tether.AsyncClient(server.addresses[0]) as aclient:
        for _ in range(2):
            async with tether.run(aclient, "mixed-a") as run:
                assert [blocking(1), await awaiting(2)] == [2, 4]
                assert run.step == 2
    with tether.Client(server.addresses[0]) as client:
        for _ in range(2):
            with tether.run(client, "mixed-s"):
                assert [await awaiting(3), blocking(4)] == [6, 5]
        keys = [e.key for e in client.journal("mixed-a") + client.journal("mixed-s")]
    assert ran == ["blocking 1", "awaiting 2", "awaiting 3", "blocking 4"]
    assert keys == ["mixed-a:1", "mixed-a:2", "mixed-s:1", "mixed-s:2"]


def test_replayed_failure_raises_without_running(make_sidecar: SidecarFactory) -> None:
    """A tool that failed (a permanent error) fails again on replay, as ReplayedToolError
    naming the original type, without running."""
    server = make_sidecar({"kb": guarded()})
    ran = 0

    @tether.tool("parse", upstream="kb")
    def parse(text: str) -> int:
        nonlocal ran
        ran += 1
        return int(text)

    with tether.Client(server.addresses[0]) as client:
        with tether.run(client, "fail-1"), pytest.raises(ValueError):
            parse("x")
        with tether.run(client, "fail-1"), pytest.raises(tether.ReplayedToolError) as caught:
            parse("x")
    assert ran == 1
    assert caught.value.error_type == "ValueError" and caught.value.metadata["replayed"] == "true"
    assert isinstance(caught.value, tether.UpstreamError) and "parse" in caught.value.message


def test_changed_arguments_are_a_non_deterministic_replay(make_sidecar: SidecarFactory) -> None:
    """A resumed run calling a step with other arguments is refused, not answered."""
    server = make_sidecar({"kb": guarded()})

    @tether.tool(upstream="kb")
    def echo(text: str) -> str:
        return text

    with tether.Client(server.addresses[0]) as client:
        with tether.run(client, "nd-1"):
            echo("a")
        with tether.run(client, "nd-1"), pytest.raises(tether.NonDeterministicReplayError):
            echo("b")


def test_in_doubt_step_idempotent_or_not(make_sidecar: SidecarFactory) -> None:
    """A step whose outcome is unknown (a connection error: the request may have got
    through) is refused on replay with OutcomeUnknownError, unless the tool is idempotent:
    then the SDK settles it for a retry and runs it again."""
    server = make_sidecar({"kb": guarded()})
    calls: Counter[str] = Counter()

    def flaky(name: str, idempotent: bool) -> Any:
        @tether.tool(name, upstream="kb", idempotent=idempotent)
        def call() -> str:
            calls[name] += 1
            if calls[name] == 1:
                raise ConnectionError("reset by peer")
            return "ok"

        return call

    once, safe = flaky("once", False), flaky("safe", True)
    with tether.Client(server.addresses[0]) as client:
        for tool_fn, run_id in ((once, "doubt-1"), (safe, "doubt-2")):
            with tether.run(client, run_id), pytest.raises(ConnectionError):
                tool_fn()
            assert [e.in_doubt for e in client.journal(run_id)] == [True]
        with tether.run(client, "doubt-1"), pytest.raises(tether.OutcomeUnknownError):
            once()
        with tether.run(client, "doubt-2"):
            assert safe() == "ok"
        with tether.run(client, "doubt-2"):
            assert safe() == "ok"  # now journaled: replayed
        states = [e.state for e in client.journal("doubt-2")]
    assert calls == {"once": 1, "safe": 2} and states == ["done"]


def test_tool_outside_a_run_is_guarded_not_journaled(
    make_sidecar: SidecarFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Called outside any run, a tool uses the default client ($TETHER_ADDRESS): admitted
    and counted by the sidecar, run every time."""
    server = make_sidecar({"kb": guarded()})
    monkeypatch.setenv("TETHER_ADDRESS", server.addresses[0])
    ran = 0

    @tether.tool(upstream="kb")
    def ping() -> str:
        nonlocal ran
        ran += 1
        return "pong"

    assert [ping(), ping()] == ["pong", "pong"] and ran == 2
    with tether.Client(server.addresses[0]) as client:
        assert client.status().upstreams["kb"].calls == 2 and client.runs() == []


# -- admission -------------------------------------------------------------------------------


def test_rate_limit_refuses_before_the_body_runs(
    make_sidecar: SidecarFactory, agent_spans: AgentSpans
) -> None:
    """Over the upstream's rate limit, the tool raises RateLimitedError (with its retry
    delay) without running; the span says so in error.type."""
    limit = {"requests_per_s": 0.01, "burst": 1, "mode": "reject"}
    server = make_sidecar({"kb": guarded(rate_limit=limit)})
    ran = 0

    @tether.tool(upstream="kb")
    def search(q: str) -> list[str]:
        nonlocal ran
        ran += 1
        return [q]

    with tether.Client(server.addresses[0]) as client, tether.run(client, "rl-1"):
        assert search("a") == ["a"]
        with pytest.raises(tether.RateLimitedError) as caught:
            search("b")
    assert ran == 1 and caught.value.retry_after_s and caught.value.retry_after_s > 1
    refused = agent_spans.named("execute_tool search")[-1]
    assert refused.attributes is not None
    assert refused.attributes["error.type"] == "RateLimitedError"
    assert not refused.status.is_ok


async def test_breaker_opens_on_transient_failures(make_sidecar: SidecarFactory) -> None:
    """Connection errors raised by an async tool count against its upstream's breaker; once
    open, the tool raises CircuitOpenError without running."""
    server = make_sidecar({"db": guarded(breaker={"fail_max": 2, "reset_timeout_s": 30})})
    ran = 0

    @tether.tool("query", upstream="db")
    async def query(sql: str) -> list[int]:
        nonlocal ran
        ran += 1
        raise ConnectionError("db down")

    async with tether.AsyncClient(server.addresses[0]) as client:
        async with tether.run(client, "br-1"):
            for _ in range(2):
                with pytest.raises(ConnectionError):
                    await query("select 1")
            with pytest.raises(tether.CircuitOpenError):
                await query("select 1")
        status = (await client.status()).upstreams["db"]
    assert ran == 2 and status.breaker_state == "open"


def test_bulkhead_refuses_a_second_concurrent_call(make_sidecar: SidecarFactory) -> None:
    """A tool called while another call holds the upstream's only slot is refused with
    OverloadedError."""
    server = make_sidecar({"db": guarded(bulkhead={"max_in_flight": 1, "max_queue": 0})})

    @tether.tool(upstream="db")
    def inner() -> int:
        return 1

    @tether.tool(upstream="db")
    def outer() -> int:
        return inner()

    with tether.Client(server.addresses[0]) as client, tether.run(client, "bh-1"):
        with pytest.raises(tether.OverloadedError):
            outer()
        assert client.status().upstreams["db"].in_flight == 0


# -- results ---------------------------------------------------------------------------------


@dataclass
class Point:
    x: int
    y: int


def test_result_that_is_not_json_is_refused_and_not_recorded(
    make_sidecar: SidecarFactory,
) -> None:
    """A result orjson cannot serialise raises a TypeError naming the tool and the type;
    the step is not recorded as a success (it stays in doubt) and the breaker is untouched."""
    server = make_sidecar({"kb": guarded(breaker={"fail_max": 1, "reset_timeout_s": 30})})

    @tether.tool("tags", upstream="kb")
    def tags() -> set[str]:
        return {"a", "b"}

    @tether.tool("point", upstream="kb")
    def point() -> Point:
        return Point(1, 2)

    with tether.Client(server.addresses[0]) as client:
        with tether.run(client, "json-1"):
            with pytest.raises(TypeError, match=r"tool 'tags' returned a set .*JSON"):
                tags()
            assert point() == {"x": 1, "y": 2}  # as the journal will replay it
        entries = client.journal("json-1")
        status = client.status().upstreams["kb"]
    assert [(e.state, e.in_doubt) for e in entries] == [("started", True), ("done", False)]
    assert status.breaker_state == "closed"


# -- spans -----------------------------------------------------------------------------------


def _span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


def _trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.trace_id:032x}"


def _parent_id(span: ReadableSpan) -> str:
    return f"{span.parent.span_id:016x}" if span.parent is not None else ""


def test_spans_join_the_sidecars_trace(
    receiver: OtlpReceiver, make_sidecar: SidecarFactory, agent_spans: AgentSpans
) -> None:
    """invoke_agent is the parent of execute_tool (GenAI names and attributes); the
    sidecar's spans for the tool's BeginCall and for a model call made in the agent are
    children of the agent's spans, in the same trace."""
    server = make_sidecar({"kb": guarded(), "mock": {"kind": "model", "type": "mock"}},
                          telemetry={"traces": "on"})  # fmt: skip

    @tether.tool("lookup", upstream="kb", description="looks things up")
    def lookup(q: str) -> str:
        return q.upper()

    with tether.Client(server.addresses[0]) as client:

        @tether.agent("planner", run_id="span-1", client=client, agent_id="planner-v1")
        def plan() -> None:
            lookup("x")
            run = tether.current_run()
            assert isinstance(run, tether.Run)
            run.model("mock", CHAT)

        plan()
        plan()  # resumed: the tool is replayed
    agent, again = agent_spans.named("invoke_agent planner")
    tool, replayed = agent_spans.named("execute_tool lookup")
    assert _parent_id(tool) == _span_id(agent) and _trace_id(tool) == _trace_id(agent)
    assert _parent_id(replayed) == _span_id(again)
    assert dict(agent.attributes or {}) == {
        "gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "planner",
        "gen_ai.agent.id": "planner-v1", "gen_ai.conversation.id": "span-1",
    }  # fmt: skip
    assert dict(tool.attributes or {}) == {
        "gen_ai.operation.name": "execute_tool", "gen_ai.tool.name": "lookup",
        "gen_ai.tool.type": "function", "gen_ai.tool.description": "looks things up",
        "tether.upstream": "kb", "gen_ai.tool.call.id": "span-1:1",
        "gen_ai.conversation.id": "span-1", "tether.replayed": False,
    }  # fmt: skip
    assert (replayed.attributes or {})["tether.replayed"] is True
    assert agent.resource.attributes["service.name"] == "agent-under-test"

    def sidecar_spans(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.trace_id == _trace_id(agent)]

    spans = receiver.wait_for(lambda s: {"tether.BeginCall", "tether.Call"}
                              <= {x.name for x in sidecar_spans(s)})  # fmt: skip
    ours = {s.name: s for s in sidecar_spans(spans)}
    assert ours["tether.BeginCall"].parent_id == _span_id(tool)
    assert ours["tether.Call"].parent_id == _span_id(agent)
    assert ours["tether.Call"].service == "sidecar-under-test"


def test_instrument_exports_over_otlp_from_the_environment(
    receiver: OtlpReceiver, make_sidecar: SidecarFactory
) -> None:
    """With only OTEL_EXPORTER_OTLP_ENDPOINT set, `instrument` exports the agent's spans by
    OTLP/gRPC to the same collector as the sidecar: two services, one trace."""
    server = make_sidecar({"mock": {"kind": "model", "type": "mock"}}, telemetry={"traces": "on"})
    handle = tether.instrument("otlp-agent")
    try:
        with (
            tether.Client(server.addresses[0]) as client,
            tether.agent("otlp", run_id="otlp-1", client=client) as run,
        ):
            run.model("mock", CHAT)
        assert handle.force_flush(5)
        spans = receiver.wait_for(lambda s: {"invoke_agent otlp", "tether.Call"}
                                  <= {x.name for x in s})  # fmt: skip
    finally:
        _instrument._reset_for_tests()
    agent = next(s for s in spans if s.name == "invoke_agent otlp")
    call = next(s for s in spans if s.name == "tether.Call")
    assert (agent.service, call.service) == ("otlp-agent", "sidecar-under-test")
    assert call.trace_id == agent.trace_id and call.parent_id == agent.span_id


def test_instrument_exports_over_otlp_http(
    loop_thread: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf: spans are POSTed as protobuf to the
    endpoint's /v1/traces (added to an endpoint without a path)."""
    received: list[tuple[str, str, list[str]]] = []

    async def traces(request: web.Request) -> web.Response:
        export = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
        for resource in export.resource_spans:
            service = next(a.value.string_value for a in resource.resource.attributes
                           if a.key == "service.name")  # fmt: skip
            names = [s.name for scope in resource.scope_spans for s in scope.spans]
            received.append((request.path, service, names))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner, port = loop_thread.run(serve_app(app))
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    try:
        handle = tether.instrument("http-agent", endpoint=f"http://127.0.0.1:{port}")
        with tether.agent("over-http"):
            pass
        assert handle.force_flush(5)
    finally:
        _instrument._reset_for_tests()
        loop_thread.run(runner.cleanup())
    assert received == [("/v1/traces", "http-agent", ["invoke_agent over-http"])]


# -- wrapped clients through the HTTP front ----------------------------------------------------


@pytest.fixture
def front(
    receiver: OtlpReceiver,
    make_sidecar: SidecarFactory,
    upstream: UpstreamApp,
    monkeypatch: pytest.MonkeyPatch,
) -> SidecarServer:
    """A sidecar whose HTTP front wants a bearer token, over a real OpenAI-shaped upstream;
    its spans go to `receiver`."""
    monkeypatch.setenv("TT_FRONT_TOKEN", "s3cret")
    monkeypatch.setenv("TETHER_TOKEN", "s3cret")
    llm = {"kind": "model", "type": "openai", "base_url": f"{upstream.url}/v1",
           "policies": {"retry": None}}  # fmt: skip
    auth = {"token_env": "TT_FRONT_TOKEN"}
    claude = {"kind": "model", "type": "mock", "policies": {"retry": None}}
    return make_sidecar({"llm": llm, "claude": claude}, listen={"http": "127.0.0.1:0"}, auth=auth,
                        telemetry={"traces": "on"})  # fmt: skip


def test_wrap_openai_replays_through_the_front(
    receiver: OtlpReceiver, front: SidecarServer, upstream: UpstreamApp, agent_spans: AgentSpans
) -> None:
    """The official openai client, wrapped, carries the run, step keys, trace and token: run
    twice with one run id, the upstream sees each request once and the second run's answers
    come from the journal."""
    assert front.http_url is not None
    plain = openai.OpenAI(base_url=f"{front.http_url}/v1", api_key="sk-provider", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        plain.models.list()
    wrapped = tether.wrap_openai(plain, url=f"{front.http_url}/v1")
    assert wrapped is plain and plain.max_retries == 0

    def agent_run() -> list[tuple[str, str | None]]:
        with (
            tether.Client(front.addresses[0]) as client,
            tether.agent("chatter", run_id="http-1", client=client),
        ):
            assert [m.id for m in wrapped.models.list()] == ["llm", "claude"]
            answers = []
            for text in ("one", "two"):
                raw = wrapped.chat.completions.with_raw_response.create(
                    model="llm", messages=[{"role": "user", "content": text}]
                )
                answers.append((raw.parse().choices[0].message.content or "",
                                raw.headers.get("x-tether-replayed")))  # fmt: skip
            return answers

    first, second = agent_run(), agent_run()
    assert first == [("echo: one", "false"), ("echo: two", "false")]
    assert second == [("echo: one", "true"), ("echo: two", "true")]
    assert len(upstream.seen) == 2
    assert all("sk-provider" not in str(seen.headers) for seen in upstream.seen)
    with tether.Client(front.addresses[0]) as client:
        keys = [e.key for e in client.journal("http-1")]
    assert keys == ["http-1:1", "http-1:2"]  # GET /v1/models takes no step
    agent = agent_spans.named("invoke_agent chatter")[0]
    trace_id, span_id = _trace_id(agent), _span_id(agent)

    def children(spans: list[Any]) -> list[Any]:
        return [s for s in spans if s.trace_id == trace_id and s.parent_id == span_id]

    # the sidecar's spans of one call may arrive in more than one export batch
    joined = children(receiver.wait_for(lambda s: bool(children(s))))
    assert joined and {s.attributes.get("gen_ai.conversation.id") for s in joined} == {"http-1"}


async def test_wrap_async_openai(front: SidecarServer, upstream: UpstreamApp) -> None:
    """An AsyncOpenAI client is wrapped with an async hook and replays the same way."""
    assert front.http_url is not None
    wrapped = tether.wrap_openai(openai.AsyncOpenAI(api_key="unused"), url=front.http_url)
    async with tether.AsyncClient(front.addresses[0]) as client:
        for _ in range(2):
            async with tether.run(client, "http-async"):
                answer = await wrapped.chat.completions.create(model="llm", messages=HELLO)
                assert answer.choices[0].message.content == "echo: hi"
    assert len(upstream.seen) == 1


def test_wrap_anthropic_replays_through_the_front(
    front: SidecarServer, agent_spans: AgentSpans
) -> None:
    """The official anthropic client, wrapped, goes to the front's /v1/messages with the run,
    step keys and token: a repeated run is answered from the journal (the upstream is hit
    once per call), streams included."""
    assert front.http_url is not None
    wrapped = tether.wrap_anthropic(anthropic.Anthropic(api_key="sk-ant-provider"),
                                    url=f"{front.http_url}/v1")  # fmt: skip
    assert str(wrapped.base_url).rstrip("/") == front.http_url

    def agent_run() -> tuple[str, str]:
        with (
            tether.Client(front.addresses[0]) as client,
            tether.agent("claude-agent", run_id="msg-1", client=client),
        ):
            answer = wrapped.messages.create(model="claude", max_tokens=32, messages=HELLO)
            with wrapped.messages.stream(model="claude", max_tokens=32, messages=HELLO) as stream:
                streamed = "".join(stream.text_stream)
            return answer.content[0].text, streamed

    first, second = agent_run(), agent_run()
    assert first == second and all(first)
    with tether.Client(front.addresses[0]) as client:
        hits = client.status().upstreams["claude"].hits
        entries = [(e.key, e.replays) for e in client.journal("msg-1")]
    assert hits == 2 and entries == [("msg-1:1", 1), ("msg-1:2", 1)]


# -- the example -------------------------------------------------------------------------------


def test_instrumented_example_resumes_after_a_crash(
    make_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    """examples/instrumented_agent.py, killed at step 4 and run again, replays steps 1-3
    (no tool body runs twice, the ledger has one line per step) and completes."""
    mock_tool = {"kind": "tool", "type": "mock"}
    server = make_sidecar({"search": mock_tool, "ledger": mock_tool,
                           "llm-backup": {"kind": "model", "type": "mock"}})  # fmt: skip
    ledger = tmp_path / "ledger.jsonl"
    agent = [sys.executable, str(ROOT / "examples/instrumented_agent.py"), "--run-id", "ex-1",
             "--steps", "5", "--ledger", str(ledger)]  # fmt: skip
    env = {**os.environ, "TETHER_ADDRESS": server.addresses[0]}
    crashed = subprocess.run([*agent, "--crash-at", "4"], env=env, capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert "step 3: executed" in crashed.stdout and "step 4: crashing" in crashed.stdout
    resumed = subprocess.run(agent, env=env, capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert all(f"step {n}: replayed" in resumed.stdout for n in (1, 2, 3))
    assert all(f"step {n}: executed" in resumed.stdout for n in (4, 5))
    assert "3 steps replayed, 2 executed; tool functions ran 4 times" in resumed.stdout
    assert [line.count('"step"') for line in ledger.read_text().splitlines()] == [1] * 5
