"""Traces, metrics and logs of a real sidecar process, with a real OTLP receiver."""

from __future__ import annotations

import contextlib
import socket
import statistics
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import tether
from tests.e2e.processes import start_sidecar, stop, write_config
from tests.integration.otlp import OtlpReceiver, ReceivedSpan
from tests.integration.support import LoopThread, UpstreamApp

SECRET = "sk-planted-KEY-0123456789abcdef"
OTLP_CLIENT = 3  # SPAN_KIND_CLIENT in the OTLP protocol
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "what is tether?"}]}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def otel_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "tether-test",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "1", **extra}  # fmt: skip


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def echo_upstream() -> Iterator[UpstreamApp]:
    loop = LoopThread()
    app = UpstreamApp()
    loop.run(app.start())
    yield app
    loop.run(app.stop())
    loop.stop()


def upstreams(echo: UpstreamApp) -> dict[str, Any]:
    retry = {"max_attempts": 3, "backoff_initial_s": 0.01, "budget_min_retries": 5}
    return {
        "llm": {"kind": "model", "type": "mock", "fail_first": 1, "policies": {"retry": retry}},
        "search": {"kind": "tool", "type": "mock"},
        "echo": {
            "kind": "model",
            "type": "openai",
            "base_url": f"{echo.url}/v1",
            "api_key_env": "TT_PLANTED_KEY",
        },
    }


def agent_tracer(endpoint: str) -> tuple[TracerProvider, Any]:
    provider = TracerProvider(resource=Resource.create({"service.name": "agent"}))
    exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, provider.get_tracer("agent")


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def test_one_trace_from_agent_to_upstream_attempts(
    short_tmp: Path, receiver: OtlpReceiver, echo_upstream: UpstreamApp
) -> None:
    """The agent's span, the sidecar's span and one CLIENT span per attempt form one trace,
    with GenAI attributes; the retry is an event on the sidecar's span."""
    config, address = write_config(short_tmp, upstreams(echo_upstream))
    env = {**otel_env(receiver.endpoint), "TT_PLANTED_KEY": SECRET}
    proc = start_sidecar(config, address, env=env)
    provider, tracer = agent_tracer(receiver.endpoint)
    try:
        with tether.Client(address) as client:
            run = client.run("trace-run")
            with tracer.start_as_current_span("agent step"):
                result = run.model("llm", CHAT)
                run.tool("search", {"q": "x"}, name="web_search")
        assert result.attempts == 2
        spans = receiver.wait_for(lambda s: len(by_name(s, "chat mock-gpt")) == 2 and
                                  by_name(s, "execute_tool web_search") and
                                  by_name(s, "agent step"))  # fmt: skip
    finally:
        provider.shutdown()
        assert stop(proc) == 0
    agent = by_name(spans, "agent step")[0]
    handling = [
        s for s in by_name(spans, "tether.Call") if s.attributes["tether.upstream"] == "llm"
    ]
    assert len(handling) == 1 and handling[0].parent_id == agent.span_id
    assert handling[0].trace_id == agent.trace_id and handling[0].service == "tether-test"
    attempts = by_name(spans, "chat mock-gpt")
    assert {a.parent_id for a in attempts} == {handling[0].span_id}
    assert sorted(a.attributes["tether.attempt"] for a in attempts) == [1, 2]
    first = next(a for a in attempts if a.attributes["tether.attempt"] == 1)
    assert first.attributes["error.type"] and first.kind == OTLP_CLIENT
    ok = next(a for a in attempts if a.attributes["tether.attempt"] == 2)
    for key, value in {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "tether.mock",
                       "gen_ai.request.model": "mock-gpt", "gen_ai.response.model": "mock-gpt",
                       "gen_ai.conversation.id": "trace-run", "gen_ai.request.stream": False,
                       "gen_ai.response.finish_reasons": ["stop"]}.items():  # fmt: skip
        assert ok.attributes[key] == value, key
    assert ok.attributes["gen_ai.usage.input_tokens"] > 0
    assert ok.attributes["gen_ai.response.id"].startswith("chatcmpl-mock-")
    assert [name for name, _ in handling[0].events] == ["retry.scheduled"]
    tool = by_name(spans, "execute_tool web_search")[0]
    assert tool.attributes["gen_ai.tool.name"] == "web_search"
    assert tool.attributes["gen_ai.operation.name"] == "execute_tool"


def _everything(spans: list[ReceivedSpan]) -> str:
    return repr([(s.name, s.attributes, s.events) for s in spans])


@pytest.mark.parametrize("capture", [False, True])
def test_content_capture_and_secrets(
    short_tmp: Path, receiver: OtlpReceiver, echo_upstream: UpstreamApp, capture: bool
) -> None:
    """Prompt text is in spans only when opted in; the API key is in no span, metric or log
    line either way, even when the upstream echoes it into its answer."""
    port = free_port()
    telemetry = {"capture_content": capture, "log_calls": True}
    config, address = write_config(
        short_tmp, upstreams(echo_upstream), metrics=f"127.0.0.1:{port}", telemetry=telemetry
    )
    log = short_tmp / "sidecar.log"
    env = {**otel_env(receiver.endpoint), "TT_PLANTED_KEY": SECRET}
    proc = start_sidecar(config, address, env=env, log=log)
    try:
        with tether.Client(address) as client:
            prompt = {"model": "m", "messages": [{"role": "user", "content": f"echo {SECRET}"}]}
            client.model("echo", prompt)
        spans = receiver.wait_for(lambda s: by_name(s, "chat m"))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    finally:
        assert stop(proc) == 0
    attempt = by_name(spans, "chat m")[0]
    assert ("gen_ai.input.messages" in attempt.attributes) == capture
    if capture:
        assert "echo ***" in attempt.attributes["gen_ai.input.messages"]
    assert echo_upstream.seen[0].headers["Authorization"] == f"Bearer {SECRET}"
    for text in (_everything(spans), metrics, log.read_text()):
        assert SECRET not in text
    assert '"msg": "call finished"' in log.read_text()


@pytest.mark.parametrize("collector", ["down", "hanging"])
def test_broken_collector_never_slows_calls(
    short_tmp: Path, receiver: OtlpReceiver, collector: str
) -> None:
    """With the collector down or hanging, calls succeed at the same speed as without
    tracing, and the spans that could not be exported are counted."""
    port = free_port()
    mock = {"m": {"kind": "model", "type": "mock", "latency_ms": 2}}
    endpoint = f"http://127.0.0.1:{free_port()}" if collector == "down" else receiver.endpoint
    receiver.hang = collector == "hanging"
    medians = {}
    for mode, env in (
        ("off", {}),
        (
            "on",
            otel_env(endpoint, OTEL_BSP_MAX_QUEUE_SIZE="64", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="32"),
        ),
    ):
        directory = short_tmp / mode
        directory.mkdir()
        config, address = write_config(directory, mock, metrics=f"127.0.0.1:{port}")
        proc = start_sidecar(config, address, env=env, log=directory / "sidecar.log")
        try:
            with tether.Client(address) as client:
                samples = []
                for _ in range(300):
                    started = time.perf_counter()
                    client.model("m", CHAT)
                    samples.append(time.perf_counter() - started)
                medians[mode] = statistics.median(samples[50:])
                time.sleep(1.5)
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        finally:
            stop(proc)
    assert medians["on"] < medians["off"] * 1.5 + 0.001, medians
    dropped = [line for line in text.splitlines()
               if line.startswith("tether_telemetry_spans_dropped_total")]  # fmt: skip
    assert dropped and float(dropped[0].split()[-1]) > 0


def test_exit_is_prompt_with_a_hanging_collector(short_tmp: Path, receiver: OtlpReceiver) -> None:
    """SIGTERM while span exports hang on a collector that never answers (and an export
    timeout of 30 s): the sidecar flushes for a bounded time, waits on nothing stuck, and
    exits 0 within 8 s; OpenTelemetry's complaints are JSON lines like every other."""
    receiver.hang = True
    config, address = write_config(short_tmp, {"m": {"kind": "model", "type": "mock"}})
    log = short_tmp / "sidecar.log"
    env = otel_env(receiver.endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="30")
    proc = start_sidecar(config, address, env=env, log=log)
    try:
        with tether.Client(address) as client:
            for _ in range(600):
                client.model("m", CHAT)
        time.sleep(0.3)  # an export is in flight, stuck
    finally:
        started = time.monotonic()
        code = stop(proc, timeout_s=60)
    assert code == 0 and time.monotonic() - started < 8
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith("{") for line in lines), lines


EXPECTED = {  # family name (OpenMetrics) -> type, labels
    "gen_ai_client_operation_duration_seconds": ("histogram", {"gen_ai_operation_name",
        "gen_ai_provider_name", "gen_ai_request_model", "tether_upstream",
        "gen_ai_response_model", "error_type"}),
    "gen_ai_client_token_usage": ("histogram", {"gen_ai_operation_name", "gen_ai_provider_name",
        "gen_ai_request_model", "tether_upstream", "gen_ai_response_model",
        "gen_ai_token_type"}),
    "gen_ai_client_operation_time_to_first_chunk_seconds": ("histogram", {
        "gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
        "tether_upstream"}),
    "tether_calls": ("counter", {"upstream", "kind", "operation", "outcome", "error_type"}),
    "tether_upstream_attempts": ("counter", {"upstream", "outcome"}),
    "tether_retries": ("counter", {"upstream", "reason"}),
    "tether_retry_budget_exhausted": ("counter", {"upstream"}),
    "tether_overhead_seconds": ("histogram", {"upstream", "kind"}),
    "tether_breaker_state": ("gauge", {"upstream"}),
    "tether_breaker_transitions": ("counter", {"upstream", "from_state", "to_state"}),
    "tether_breaker_rejections": ("counter", {"upstream"}),
    "tether_rate_limit_rejections": ("counter", {"upstream"}),
    "tether_rate_limit_wait_seconds": ("histogram", {"upstream"}),
    "tether_bulkhead_in_flight": ("gauge", {"upstream"}),
    "tether_bulkhead_queued": ("gauge", {"upstream"}),
    "tether_bulkhead_rejections": ("counter", {"upstream"}),
    "tether_fallbacks": ("counter", {"upstream", "reason"}),
    "tether_journal_replays": ("counter", {"upstream"}),
    "tether_journal_in_doubt": ("counter", {"upstream"}),
    "tether_journal_write_seconds": ("histogram", {"durable"}),
    "tether_journal_in_doubt_entries": ("gauge", set()),
    "tether_cost_usd": ("counter", {"upstream", "gen_ai_request_model",
                                    "gen_ai_response_model"}),
    "tether_telemetry_spans_dropped": ("counter", set()),
    "tether_build": ("info", {"version", "python"}),
}  # fmt: skip


def _traffic(client: tether.Client) -> None:
    """Calls that make every metric move: retries, a breaker trip and fallbacks, rate-limit
    waits and refusals, a full bulkhead, a stream, journal replays, priced tokens."""
    run = client.run("metrics-run")
    for _ in range(3):
        run.model("llm", CHAT)
    again = client.run("metrics-run")
    for _ in range(3):
        assert again.model("llm", CHAT).replayed
    for _ in range(6):
        client.model("flaky", CHAT)  # trips its breaker; backup answers
    list(client.stream_model("llm", CHAT))
    for name in ("limited", "paced"):  # refusals, then waits
        for _ in range(3):
            with contextlib.suppress(tether.RateLimitedError):
                client.model(name, CHAT)
    with contextlib.suppress(tether.UpstreamError):
        client.model("dead", CHAT)  # its only retry is refused by an empty budget
    for _ in range(2):  # a tool cut by its timeout is in doubt; the same key is refused
        with contextlib.suppress(tether.TetherError):
            client.tool("stuck", {"x": 1}, run_id="doubt", idempotency_key="k")


def test_metrics_endpoint_exposes_every_metric(short_tmp: Path, receiver: OtlpReceiver) -> None:
    """After traffic, /metrics has every metric with its type and labels, and latency
    buckets carry trace-id exemplars in OpenMetrics format."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    port = free_port()
    fast = {"max_attempts": 2, "backoff_initial_s": 0.01, "budget_min_retries": 5}
    ups = {
        "llm": {"kind": "model", "type": "mock", "fail_first": 1, "policies": {"retry": fast}},
        "flaky": {"kind": "model", "type": "mock", "failure_rate": 1.0, "policies": {
            "retry": None, "breaker": {"fail_max": 2, "reset_timeout_s": 60},
            "fallback": ["backup"]}},
        "backup": {"kind": "model", "type": "mock"},
        "limited": {"kind": "model", "type": "mock", "policies": {
            "rate_limit": {"requests_per_s": 1, "burst": 1, "mode": "reject"}}},
        "paced": {"kind": "model", "type": "mock", "policies": {
            "rate_limit": {"requests_per_s": 10, "burst": 1, "mode": "wait"}}},
        "narrow": {"kind": "model", "type": "mock", "latency_ms": 100, "policies": {
            "bulkhead": {"max_in_flight": 1, "max_queue": 0}}},
        "dead": {"kind": "model", "type": "mock", "failure_rate": 1.0, "policies": {
            "breaker": None, "retry": {"max_attempts": 3, "budget_ratio": 0,
                                       "budget_min_retries": 0}}},
        "stuck": {"kind": "tool", "type": "mock", "failure_rate": 1.0, "failure_kind": "hang",
                  "timeout_s": 0.1},
    }  # fmt: skip
    prices = {"*": {"input_per_1m_usd": 1.0, "output_per_1m_usd": 2.0}}
    config, address = write_config(
        short_tmp,
        ups,
        metrics=f"127.0.0.1:{port}",
        telemetry={"prices": prices},
        journal={"retention": {"interval_s": 0.5}},  # refreshes the in-doubt gauge
    )
    proc = start_sidecar(config, address, env=otel_env(f"http://127.0.0.1:{free_port()}"))
    try:
        with tether.Client(address) as client:
            _traffic(client)
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda _: _ignore(client.model, "narrow", CHAT), range(8)))
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
        time.sleep(2.5)  # a failed span export, counted
        text = urllib.request.urlopen(request).read().decode()
    finally:
        assert stop(proc) == 0
    families = {f.name: f for f in text_string_to_metric_families(text)}
    missing = []
    for name, (kind, labels) in EXPECTED.items():
        family = families.get(name)
        if family is None or family.type != kind or not family.samples:
            missing.append(name)
            continue
        seen = set().union(*(set(s.labels) for s in family.samples)) - {"le", "quantile"}
        assert seen == labels, name
    assert not missing, missing
    buckets = [s for s in families["gen_ai_client_operation_duration_seconds"].samples
               if s.exemplar is not None]  # fmt: skip
    assert buckets and len(buckets[0].exemplar.labels["trace_id"]) == 32
    (in_doubt,) = families["tether_journal_in_doubt_entries"].samples
    assert in_doubt.value == 1  # the "stuck" tool call of run "doubt"


def _ignore(fn: Any, *args: Any) -> None:
    with contextlib.suppress(tether.TetherError):
        fn(*args)
