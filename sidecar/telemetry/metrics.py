"""Every metric the sidecar exports, defined here and only here (prometheus-client).

Labels are bounded: upstream names and kinds come from the config, operations and models
are capped per upstream (`LabelCap`), outcomes and error types are small fixed sets. Run
ids, keys and payload text never become labels. Each `Metrics` has its own registry, so two
sidecars in one process (tests) do not mix their numbers.

GenAI metrics follow the OpenTelemetry GenAI semantic conventions (names with `.` as `_`,
units as suffixes) with their advised bucket boundaries; latency histograms carry the trace
id of the call as an OpenMetrics exemplar when the call's span is sampled and exported.

`tether_overhead_seconds` is what the sidecar costs a call: the call's elapsed time, from
when the sidecar began working on the request, minus the time spent in upstream attempts
and minus retry backoff sleeps. It includes the sidecar's own work (parsing and checking the
request, the policies, journal reads and writes, telemetry) and queueing for rate-limit
tokens and bulkhead slots, which the sidecar imposes; it excludes the upstream's time and the
backoff sleeps between attempts, which are the upstream's doing.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sidecar import __version__

# Bucket advice of the GenAI semantic conventions.
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)  # fmt: skip
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)  # fmt: skip
CHUNK_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
# The sidecar's own cost per call: from tens of microseconds up.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 1.0)  # fmt: skip
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
WRITE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)

BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2, "disabled": -1}
GENAI = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model",
         "tether_upstream")  # fmt: skip
# the model that answered: the answering route's model (a fallback's, say), else the one
# requested; empty when nothing answered
RESPONSE_MODEL = "gen_ai_response_model"
CALL = ("upstream", "kind", "operation")
OTHER = "_other"


class LabelCap:
    """At most `limit` distinct values per upstream; later ones are reported as `_other`."""

    def __init__(self, limit: int = 32) -> None:
        self.limit = limit
        self._seen: dict[str, set[str]] = {}

    def __call__(self, upstream: str, value: str) -> str:
        seen = self._seen.setdefault(upstream, set())
        if value in seen:
            return value
        if len(seen) >= self.limit:
            return OTHER
        seen.add(value)
        return value


class Labelled:
    """`metric.labels(*values)`, remembered by label values.

    prometheus-client checks and converts the values on every `labels()` call; a call's
    path asks for the same few children again and again. Label values are bounded (see
    above), so this dict is too.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


class Metrics:
    """The sidecar's metrics, in their own registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.cap_model = LabelCap()
        self.cap_operation = LabelCap()

        # GenAI semantic conventions
        self.operation_duration = Histogram(
            "gen_ai_client_operation_duration_seconds", "GenAI operation duration.",
            (*GENAI, RESPONSE_MODEL, "error_type"), buckets=DURATION_BUCKETS,
            registry=r)  # fmt: skip
        self.token_usage = Histogram(
            "gen_ai_client_token_usage", "Number of input and output tokens used.",
            (*GENAI, RESPONSE_MODEL, "gen_ai_token_type"), buckets=TOKEN_BUCKETS,
            registry=r)  # fmt: skip
        self.time_to_first_chunk = Histogram(
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time from the request to the first chunk of a streamed answer.",
            GENAI, buckets=CHUNK_BUCKETS, registry=r)  # fmt: skip

        # Calls and attempts
        self.calls = Counter(
            "tether_calls", "Calls by outcome (ok, error, replayed, refused).",
            (*CALL, "outcome", "error_type"), registry=r)  # fmt: skip
        self.attempts = Counter(
            "tether_upstream_attempts", "Attempts that reached an upstream, by outcome.",
            ("upstream", "outcome"), registry=r)  # fmt: skip
        self.retries = Counter(
            "tether_retries", "Retries scheduled, by the failure that caused them.",
            ("upstream", "reason"), registry=r)  # fmt: skip
        self.retry_budget_exhausted = Counter(
            "tether_retry_budget_exhausted", "Retries refused because the budget was spent.",
            ("upstream",), registry=r)  # fmt: skip
        self.overhead = Histogram(
            "tether_overhead_seconds",
            "Time a call spent in the sidecar: elapsed minus upstream attempts and backoff "
            "sleeps (its own work and queueing for rate-limit and bulkhead slots).",
            ("upstream", "kind"), buckets=OVERHEAD_BUCKETS, registry=r)  # fmt: skip

        # Policies
        self.breaker_transitions = Counter(
            "tether_breaker_transitions", "Breaker state changes.",
            ("upstream", "from_state", "to_state"), registry=r)  # fmt: skip
        self.breaker_rejections = Counter(
            "tether_breaker_rejections", "Attempts refused by an open or probing breaker.",
            ("upstream",), registry=r)  # fmt: skip
        self.rate_limit_rejections = Counter(
            "tether_rate_limit_rejections", "Calls refused by a rate limit.",
            ("upstream",), registry=r)  # fmt: skip
        self.rate_limit_wait = Histogram(
            "tether_rate_limit_wait_seconds", "Time calls waited for a rate-limit slot.",
            ("upstream",), buckets=WAIT_BUCKETS, registry=r)  # fmt: skip
        self.bulkhead_rejections = Counter(
            "tether_bulkhead_rejections", "Calls refused by a full bulkhead.",
            ("upstream",), registry=r)  # fmt: skip
        self.fallbacks = Counter(
            "tether_fallbacks", "Calls passed on to the next upstream in `fallback`.",
            ("upstream", "reason"), registry=r)  # fmt: skip
        self.streams_cut = Counter(
            "tether_streams_cut", "Streams that failed after their first chunk was sent.",
            ("upstream", "reason"), registry=r)  # fmt: skip
        self.stream_recoveries = Counter(
            "tether_stream_recoveries",
            "Streams cut after their first chunk and then recovered (continued by a prefill, "
            "replayed) or not (gave_up, refused), by the upstream that answered last.",
            ("upstream", "outcome"), registry=r)  # fmt: skip

        # Journal
        self.journal_replays = Counter(
            "tether_journal_replays", "Calls answered from the journal.",
            ("upstream",), registry=r)  # fmt: skip
        self.journal_in_doubt = Counter(
            "tether_journal_in_doubt", "Calls refused as outcome unknown.",
            ("upstream",), registry=r)  # fmt: skip
        self.journal_too_large = Counter(
            "tether_journal_too_large", "Answers too large to keep for replay.",
            ("upstream",), registry=r)  # fmt: skip
        self.journal_write = Histogram(
            "tether_journal_write_seconds", "Time from a journal write to its commit.",
            ("durable",), buckets=WRITE_BUCKETS, registry=r)  # fmt: skip
        self.journal_in_doubt_entries = Gauge(
            "tether_journal_in_doubt_entries",
            "Journal entries begun and never completed, not executing now: outcome unknown "
            "until resolved (refreshed at each retention pass).", registry=r)  # fmt: skip

        # The shared state store (state.backend: redis)
        self.store_errors = Counter(
            "tether_store_errors", "Shared state store operations that failed or timed out.",
            ("store", "upstream", "policy"), registry=r)  # fmt: skip
        self.store_fallbacks = Counter(
            "tether_store_fallbacks",
            "Policy decisions made without the shared state store (by on_store_error: "
            "locally, or refused).", ("store", "upstream", "policy"), registry=r)  # fmt: skip
        self.store_incidents = Counter(
            "tether_store_incidents", "Times the shared state store stopped answering.",
            ("store",), registry=r)  # fmt: skip
        self.store_up = Gauge(
            "tether_store_up", "1 while the shared state store answers, 0 during an incident.",
            ("store",), registry=r)  # fmt: skip

        # Cost, telemetry, build
        self.cost = Counter(
            "tether_cost_usd", "Estimated cost in US dollars from the configured price table, "
            "priced by the model that answered.",
            ("upstream", "gen_ai_request_model", RESPONSE_MODEL), registry=r)  # fmt: skip
        self.spans_dropped = Counter(
            "tether_telemetry_spans_dropped", "Spans that could not be exported.", registry=r
        )
        self.build = Info("tether_build", "Build information.", registry=r)
        self.build.info({"version": __version__, "python": platform.python_version()})

        # Children of the per-call metrics, by label values (see `Labelled`).
        self.calls_of = Labelled(self.calls)
        self.attempts_of = Labelled(self.attempts)
        self.duration_of = Labelled(self.operation_duration)
        self.overhead_of = Labelled(self.overhead)
        self.tokens_of = Labelled(self.token_usage)
        self.cost_of = Labelled(self.cost)
        self.first_chunk_of = Labelled(self.time_to_first_chunk)

        # Read at scrape time from the live policy state: nothing to update per call.
        self.live: Callable[[], Iterable[LiveUpstream]] = tuple
        r.register(_LiveCollector(self))


@dataclass(frozen=True, slots=True)
class LiveUpstream:
    """An upstream's state at scrape time."""

    upstream: str
    breaker_state: str  # closed, half_open, open, disabled
    in_flight: int
    queued: int


class _LiveCollector(Collector):
    """tether_breaker_state, tether_bulkhead_in_flight and tether_bulkhead_queued."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("tether_breaker_state",
                              "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
                              labels=["upstream"]),
            GaugeMetricFamily("tether_bulkhead_in_flight", "Calls holding a bulkhead slot.",
                              labels=["upstream"]),
            GaugeMetricFamily("tether_bulkhead_queued", "Calls waiting for a bulkhead slot.",
                              labels=["upstream"]),
        ]  # fmt: skip

    def collect(self) -> Iterable[Metric]:
        state, in_flight, queued = self._families()
        for live in self._metrics.live():
            if live.breaker_state != "disabled":
                state.add_metric([live.upstream], BREAKER_STATE_VALUES[live.breaker_state])
            in_flight.add_metric([live.upstream], live.in_flight)
            queued.add_metric([live.upstream], live.queued)
        return [state, in_flight, queued]
