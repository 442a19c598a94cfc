"""`tether top`: the golden signals of a running sidecar in the terminal, for those without
Grafana. Reads `GetStatus` every interval (rates come from the difference of two readings),
and, with `--metrics URL`, latency percentiles from the Prometheus histogram.

Once running, it outlives the sidecar and the metrics URL going away: the view says what
failed, keeps the last good reading, and tries again every interval.
"""

from __future__ import annotations

import sys
import time
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich import box
from rich.console import Console, Group, JustifyMethod
from rich.live import Live
from rich.table import Table
from rich.text import Text

import tether

BREAKER_STYLE = {"closed": "green", "half_open": "yellow", "open": "bold red", "disabled": "dim"}
LATENCY = "gen_ai_client_operation_duration_seconds"
PIPE_WIDTH = 160


@dataclass
class Reading:
    at: float
    status: tether.Status | None  # None: the sidecar did not answer (see `error`)
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    error: str = ""


def histogram_buckets(url: str) -> dict[str, list[tuple[float, float]]]:
    """Cumulative latency buckets per upstream, from a Prometheus text endpoint."""
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    by_upstream: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != LATENCY:
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                upstream = sample.labels.get("tether_upstream", "?")
                bound = float(sample.labels["le"])
                merged = by_upstream.setdefault(upstream, {})
                merged[bound] = merged.get(bound, 0.0) + sample.value
    return {u: sorted(b.items()) for u, b in by_upstream.items()}


def quantile(q: float, now: list[tuple[float, float]], before: list[tuple[float, float]]) -> float:
    """The q-quantile of the observations between two readings of cumulative buckets."""
    old = dict(before)
    counts = [(bound, value - old.get(bound, 0.0)) for bound, value in now]
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank, previous = q * total, 0.0
    for bound, cumulative in counts:
        if cumulative >= rank:
            return bound if bound != float("inf") else previous
        previous = bound
    return previous


# (header, justify): rates over the last interval, the state now, then totals since start (Σ)
COLUMNS: tuple[tuple[str, JustifyMethod], ...] = (
    ("upstream", "left"), ("state", "left"), ("req/s", "right"), ("err/s", "right"),
    ("p50", "right"), ("p99", "right"), ("busy", "right"), ("Σretry", "right"),
    ("Σfallbk", "right"), ("Σrefuse", "right"), ("budget", "right"),
)  # fmt: skip
BREAKER_SHORT = {"closed": "ok", "half_open": "half", "open": "OPEN", "disabled": "off"}
LEGEND = (
    "state: breaker (ok, half open, OPEN, off); /s, p50 and p99 (ms): over the last "
    "interval; busy: in flight+queued now; Σ: totals since start; budget: retries left"
)


def table(now: Reading, before: Reading) -> Group:
    """The view of two readings that both have a status: one row per upstream, readable at
    80 columns (an upstream's long name folds onto a second line)."""
    assert now.status is not None and before.status is not None
    seconds = max(now.at - before.at, 1e-9)
    status = now.status
    head = Text(
        f"tether {status.version}  config {status.config_version}  "
        f"{'serving' if status.serving else 'NOT SERVING'}  in flight {status.in_flight}"
    )
    grid = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0), pad_edge=False)
    for header, justify in COLUMNS:
        width = 16 if header == "upstream" else None
        grid.add_column(header, justify=justify, overflow="fold", max_width=width)
    for name, up in status.upstreams.items():
        old = before.status.upstreams.get(name, up)
        p50 = p99 = float("nan")
        if name in now.buckets:
            p50 = quantile(0.5, now.buckets[name], before.buckets.get(name, []))
            p99 = quantile(0.99, now.buckets[name], before.buckets.get(name, []))
        state = Text(BREAKER_SHORT.get(up.breaker_state, up.breaker_state),
                     style=BREAKER_STYLE.get(up.breaker_state, ""))  # fmt: skip
        budget = up.gauges.get("retry.budget_left")
        grid.add_row(
            name, state, _rate(up.calls - old.calls, seconds),
            _rate(up.errors - old.errors, seconds), _ms(p50), _ms(p99),
            f"{up.in_flight}+{up.queued}", str(up.retries), str(up.fallbacks), str(up.rejected),
            "-" if budget is None else f"{budget:.0f}",
        )  # fmt: skip
    return Group(head, grid, Text(LEGEND, style="dim"))


def _rate(count: int, seconds: float) -> str:
    rate = count / seconds
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}"


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1000:.0f}"  # NaN: no data


def _reason(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__


def read(client: tether.Client, metrics_url: str | None, *, first: bool = False) -> Reading:
    """A reading; what could not be read is said in `error`, not raised (except a sidecar
    that does not answer the `first` reading: nothing to show)."""
    problems = []
    status = None
    try:
        status = client.status()
    except Exception as exc:  # the sidecar went away, or answers with an error
        if first:
            raise
        problems.append(f"sidecar: {_reason(exc)}")
    buckets: dict[str, list[tuple[float, float]]] = {}
    if metrics_url:
        try:
            buckets = histogram_buckets(metrics_url)
        except Exception as exc:  # refused, timed out, not Prometheus text
            problems.append(f"metrics {metrics_url}: {_reason(exc)}")
    return Reading(time.monotonic(), status, buckets, "; ".join(problems))


def view(now: Reading, last_good: Reading) -> Group:
    """The table of `now` against the last reading with a status, and what failed."""
    problem = Text(f"{now.error} (trying again)", style="bold red") if now.error else Text("")
    if now.status is not None:
        return Group(table(now, last_good), problem)
    ago = now.at - last_good.at
    return Group(problem, Text(f"last reading, {ago:.0f} s ago:"), table(last_good, last_good))


def run_top(
    address: str | None,
    metrics_url: str | None,
    interval_s: float,
    once: bool,
    *,
    updates: int | None = None,
) -> int:
    """Print one reading (`once`), or show a live view until interrupted (or `updates`)."""
    with tether.Client(address, timeout_s=5) as client:
        before = read(client, metrics_url, first=True)
        if once:
            time.sleep(interval_s)
            width = None if sys.stdout.isatty() else PIPE_WIDTH  # no terminal to measure
            Console(width=width).print(view(read(client, metrics_url), before))
            return 0
        with Live(view(before, before), refresh_per_second=4, screen=False) as live:
            while updates is None or updates > 0:
                time.sleep(interval_s)
                now = read(client, metrics_url)
                live.update(view(now, before))
                if now.status is not None:
                    before = now
                if updates is not None:
                    updates -= 1
        return 0
