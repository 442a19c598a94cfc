"""Every dashboard query returns data from a real Prometheus scraping a real sidecar under load.

The load injects the faults the dashboards are about: a breaker trip (an outage), retries and
an exhausted retry budget (a flaky upstream), rate limiting (waits and refusals), a full
bulkhead (queueing and shedding), fallbacks, journal replays, and an in-doubt call (a
non-idempotent call cut by `kill -9`, refused after the restart).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

import tether
from tests.conftest import ROOT, require_service
from tests.e2e.processes import start_sidecar, stop, write_config
from tests.e2e.prometheus import BINARY, Prometheus, free_port
from tests.integration.support import LoopThread, serve_app

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

DASHBOARDS = ("tether-overview.json", "tether-runs.json")
# Grafana's variables as a test fills them in: All upstreams, the default rate window.
VARIABLES = {"upstream": ".*", "__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
LABEL_VALUES = re.compile(r"^label_values\((\w+), *(\w+)\)$")
LOAD_S = 8.0
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CHAT = {"model": "mock-gpt", "messages": [{"role": "user", "content": "What is Tether?"}]}

UPSTREAMS: dict[str, Any] = {
    # an outage after hit 30: the breaker opens, probes, closes; llm-backup answers meanwhile
    "llm": {"kind": "model", "type": "mock", "latency_ms": 10,
            "outage": {"after_hits": 30, "duration_s": 1.5},
            "policies": {"retry": {"max_attempts": 2, "backoff_initial_s": 0.01},
                         "breaker": {"fail_max": 3, "reset_timeout_s": 0.3},
                         "fallback": ["llm-backup"]}},
    "llm-backup": {"kind": "model", "type": "mock", "latency_ms": 5},
    # fails half its attempts: retries until the small budget is spent
    "llm-flaky": {"kind": "model", "type": "mock", "latency_ms": 5, "failure_rate": 0.5,
                  "seed": 3,
                  "policies": {"retry": {"max_attempts": 3, "backoff_initial_s": 0.005,
                                         "budget_ratio": 0.1},
                               "breaker": {"fail_max": 1000}}},
    # 20 calls a second: callers wait up to 50 ms, beyond that they are refused
    "search": {"kind": "tool", "type": "mock", "latency_ms": 2,
               "policies": {"rate_limit": {"requests_per_s": 20, "burst": 2, "mode": "wait",
                                           "max_wait_s": 0.05}}},
    # one call at a time, one more queued: the rest is shed
    "narrow": {"kind": "tool", "type": "mock", "latency_ms": 150,
               "policies": {"bulkhead": {"max_in_flight": 1, "max_queue": 1,
                                         "queue_timeout_s": 0.1}}},
    "ledger": {"kind": "tool", "type": "mock", "latency_ms": 2},  # journaled, replayed
    "ledger-slow": {"kind": "tool", "type": "mock", "latency_ms": 20_000},  # cut by kill -9
}  # fmt: skip
TELEMETRY = {"prices": {"mock-gpt": {"input_per_1m_usd": 2.5, "output_per_1m_usd": 10.0}}}


def fill(expr: str) -> str:
    """`expr` with Grafana's variables ($x, ${x}) replaced; KeyError names an unknown one."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: VARIABLES[m.group(1)], expr)


def prometheus_targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every Prometheus query; Tempo (TraceQL) targets are skipped."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            if target["datasource"]["uid"] == "prometheus":
                yield panel["title"], target


def check_dashboard(name: str, prometheus: Prometheus) -> list[str]:
    """One line per panel target that errs or returns no series (and per missing exemplar)."""
    dashboard = json.loads((ROOT / "dashboards" / name).read_text())
    failures = []
    for title, target in prometheus_targets(dashboard):
        where = f"{name}: panel {title!r} ({target['refId']})"
        try:
            expr = fill(target["expr"])
            if not prometheus.query(expr):
                failures.append(f"{where} returned no series: {expr}")
            elif target.get("exemplar") and not any(
                "trace_id" in e["labels"] for e in prometheus.exemplars(expr)
            ):
                failures.append(f"{where} has no exemplar with a trace_id: {expr}")
        except (KeyError, RuntimeError) as error:
            failures.append(f"{where} failed: {error!r}")
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = LABEL_VALUES.findall(variable["query"])[0]
            if not prometheus.api(f"label/{label}/values", **{"match[]": metric}):
                failures.append(f"{name}: variable {variable['name']!r} has no values")
    return failures


Make = Callable[[tether.Client, int], Any]


def replayed_model(client: tether.Client, i: int) -> tether.Result:
    """Five keys, used over and over: the first call of each runs, the others replay."""
    return client.model("llm-backup", CHAT, run_id="replays", idempotency_key=f"m{i % 5}")


def replayed_tool(client: tether.Client, i: int) -> tether.Result:
    return client.tool("ledger", {"n": i % 5}, run_id="replays", idempotency_key=f"t{i % 5}")


class Load:
    """Calls through the sidecar from many threads; counts how each call ended."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.outcomes: Counter[str] = Counter()
        self._lock = threading.Lock()

    def call(self, make: Make, client: tether.Client, i: int) -> None:
        try:
            make(client, i)
            outcome = "ok"
        except tether.TetherError as error:
            outcome = type(error).__name__
        with self._lock:
            self.outcomes[outcome] += 1

    def loop(self, until: float, make: Make) -> None:
        with tether.Client(self.address, timeout_s=10) as client:
            i = 0
            while time.monotonic() < until:
                self.call(make, client, i)
                i += 1

    def run(self, seconds: float) -> None:
        until = time.monotonic() + seconds
        workers: list[Make] = [
            *[lambda c, i: c.model("llm", CHAT)] * 2,
            *[lambda c, i: c.model("llm-flaky", CHAT)] * 2,
            *[lambda c, i: c.tool("search", {"q": i}, name="search")] * 3,
            *[lambda c, i: c.tool("narrow", {"q": i}, name="narrow")] * 4,
            replayed_model,
            replayed_tool,
        ]
        with ThreadPoolExecutor(len(workers)) as pool:
            for future in [pool.submit(self.loop, until, make) for make in workers]:
                future.result()


def journaled(client: tether.Client, run_id: str) -> bool:
    """Whether the journal holds a call of `run_id` (started or finished)."""
    try:
        return bool(client.journal(run_id))
    except tether.NotFoundError:
        return False


def crash_into_doubt(
    proc: subprocess.Popen[bytes], config: Path, address: str, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    """Cut a non-idempotent call with kill -9, restart, and have its retry refused in doubt."""
    call = {"run_id": "doubt", "idempotency_key": "k1"}
    with ThreadPoolExecutor(1) as pool, tether.Client(address, timeout_s=60) as client:
        cut = pool.submit(client.tool, "ledger-slow", {"pay": 1}, **call)
        deadline = time.monotonic() + 10
        while not journaled(client, "doubt") and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert isinstance(cut.exception(15), tether.TetherError)
    proc = start_sidecar(config, address, env=env, log=log.with_suffix(".restarted.log"))
    with tether.Client(address) as client, pytest.raises(tether.OutcomeUnknownError):
        client.tool("ledger-slow", {"pay": 1}, **call)
    return proc


def finish(proc: subprocess.Popen[bytes]) -> None:
    try:
        stop(proc)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def prometheus_binary() -> None:
    why = "no prometheus on PATH (apt-get install prometheus)"
    require_service("prometheus", BINARY is not None, why)


def test_prometheus_harness_scrapes_a_stub(prometheus_binary: None, short_tmp: Path) -> None:
    """The harness's Prometheus scrapes an OpenMetrics endpoint, exemplars included."""
    text = (
        "# TYPE stub_calls counter\n"
        'stub_calls_total{upstream="llm"} 3\n'
        "# TYPE stub_latency_seconds histogram\n"
        f'stub_latency_seconds_bucket{{le="0.1"}} 1 # {{trace_id="{TRACE_ID}"}} 0.05\n'
        'stub_latency_seconds_bucket{le="+Inf"} 1\n'
        "stub_latency_seconds_sum 0.05\nstub_latency_seconds_count 1\n# EOF\n"
    )
    content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8"

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=text.encode(), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    loop = LoopThread()
    runner, port = loop.run(serve_app(app))
    prometheus = Prometheus(short_tmp / "prometheus", [f"127.0.0.1:{port}"]).start()
    try:
        assert prometheus.wait_scraped(), prometheus.log_tail()
        assert prometheus.query(fill('sum by (upstream) (stub_calls_total{upstream=~"$upstream"})'))
        exemplars = prometheus.exemplars("stub_latency_seconds_bucket")
        assert exemplars and exemplars[0]["labels"]["trace_id"] == TRACE_ID
    finally:
        prometheus.stop()
        loop.run(runner.cleanup())
        loop.stop()


def test_every_dashboard_query_returns_series(prometheus_binary: None, short_tmp: Path) -> None:
    """After a fault-injecting load, every Prometheus query of every panel returns a series
    (latency queries with trace exemplars); failures are listed by panel title."""
    metrics = f"127.0.0.1:{free_port()}"
    # Shared state on a Redis that is not there: the store's incident and the policies'
    # local decisions (fail_open) feed the "Shared stores" panel.
    state = {"backend": "redis", "url": f"redis://127.0.0.1:{free_port()}/0",
             "timeout_s": 0.05, "retry_after_s": 1.0}  # fmt: skip
    config, address = write_config(
        short_tmp, UPSTREAMS, metrics=metrics, telemetry=TELEMETRY, state=state
    )
    # Tracing on (an absent collector: spans are dropped and counted), for exemplars.
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_SERVICE_NAME": "tether-sidecar",
    }
    log = short_tmp / "sidecar.log"
    prometheus = Prometheus(short_tmp / "prometheus", [metrics]).start()
    proc = start_sidecar(config, address, env=env, log=log)
    load = Load(address)
    try:
        proc = crash_into_doubt(proc, config, address, env, log)
        assert prometheus.wait_scraped(), f"no scrape of {metrics}: {prometheus.scrape_errors()}"
        load.run(LOAD_S)
        time.sleep(3)  # a few more scrapes after the load
        failures = [line for name in DASHBOARDS for line in check_dashboard(name, prometheus)]
    finally:
        finish(proc)
        prometheus.stop()
    assert not failures, (
        f"{len(failures)} dashboard queries came back empty or failed "
        f"(load outcomes: {dict(load.outcomes)}):\n" + "\n".join(failures)
    )
