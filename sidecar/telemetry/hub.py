"""The sidecar's telemetry in one object: metrics, tracer, content capture, prices, secrets."""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace.export import SpanExporter

from sidecar.config import Config, resolve_secret, secret_fields
from sidecar.telemetry.calls import TracedCall
from sidecar.telemetry.metrics import LiveUpstream, Metrics
from sidecar.telemetry.tracing import Tracing, tracing_wanted
from sidecar.upstreams.base import UpstreamRequest, Usage

log = logging.getLogger("tether.sidecar.telemetry")

CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"


def config_secrets(config: Config) -> list[str]:
    """Every secret value the configuration names (API keys, secret headers, the token)."""
    found = [
        resolve_secret(env, what=path) for path, env in secret_fields(config) if os.environ.get(env)
    ]
    return [s for s in found if s]


class Telemetry:
    """Metrics always; traces when wanted (see `tracing`); one per sidecar."""

    def __init__(self, config: Config, *, exporter: SpanExporter | None = None) -> None:
        settings = config.telemetry
        self.metrics = Metrics()
        wanted = tracing_wanted(settings.traces) or exporter is not None
        self.tracing = Tracing(self.metrics, enabled=wanted, exporter=exporter)
        self.tracer = self.tracing.tracer
        capture = settings.capture_content
        if capture is None:
            capture = os.environ.get(CAPTURE_ENV, "").lower() == "true"
        self.capture_content = capture
        self.log_calls = settings.log_calls
        self.prices = settings.prices
        self.routes: dict[str, Any] = {}
        self._secrets = sorted(config_secrets(config), key=len, reverse=True)

    def redact(self, text: str) -> str:
        """`text` with every configured secret replaced by `***`."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def cost(self, usage: Usage, *models: str) -> float:
        """Estimated US dollars for `usage`, at the price of the first of `models` that has
        one, else the `*` price (0 without either)."""
        price = next((self.prices[m] for m in models if m in self.prices), self.prices.get("*"))
        if price is None:
            return 0.0
        return (usage.input_tokens * price.input_per_1m_usd
                + usage.output_tokens * price.output_per_1m_usd) / 1e6  # fmt: skip

    def call(
        self,
        route: Any,
        request: UpstreamRequest,
        *,
        rpc: str,
        stream: bool,
        metadata: Any,
        started: float | None = None,
        attach: bool = True,
    ) -> TracedCall:
        """The telemetry of one call (see `TracedCall` for `started` and `attach`)."""
        return TracedCall(self, route, request, rpc=rpc, stream=stream, metadata=metadata,
                          started=started, attach=attach)  # fmt: skip

    def watch(self, routes: dict[str, Any]) -> None:
        """Follow these routes: live gauges at scrape time, breaker transitions as they happen."""
        self.routes = routes
        self.metrics.live = lambda: [
            LiveUpstream(
                name,
                route.breaker.state if route.breaker is not None else "disabled",
                route.in_flight,
                route.bulkhead.queued if route.bulkhead is not None else 0,
            )
            for name, route in routes.items()
        ]
        for route in routes.values():
            if route.breaker is not None:
                route.breaker.on_transition = self.breaker_transition

    def breaker_transition(self, upstream: str, old: str, new: str) -> None:
        self.metrics.breaker_transitions.labels(upstream, old, new).inc()
        trace.get_current_span().add_event(
            "breaker.state_change", {"tether.upstream": upstream, "from": old, "to": new}
        )

    def journal_commit(self, seconds: float, durable: bool) -> None:
        """Called by the journal's writer thread after each commit."""
        self.metrics.journal_write.labels("true" if durable else "false").observe(seconds)

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Flush queued spans for at most about `timeout_s`, then stop exporting."""
        self.tracing.shutdown(timeout_s)
