"""Tether's Grafana dashboards, as code: `python dashboards/generate.py` rewrites the JSON.

The output is committed (Grafana provisions it from files); `--check` exits 1 when the
committed files differ from what this program makes; `--markdown` prints a table of the
panels and the questions they answer, for the README. Datasources are referenced by the fixed
UIDs of `provisioning/datasources/datasources.yaml`, so there are no `${DS_...}` inputs.
Every panel answers one question, written in its description. Metric names come from
`sidecar/telemetry/metrics.py` (counters end in `_total`, histograms in `_bucket`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}
TEMPO = {"type": "tempo", "uid": "tempo"}
UP = 'upstream=~"$upstream"'  # the `upstream` variable; All is `.*`
GENAI_UP = 'tether_upstream=~"$upstream"'  # the GenAI metrics name it `tether_upstream`
RATE = "[$__rate_interval]"
Panel = dict[str, Any]


def prom(expr: str, legend: str, *, exemplar: bool = False, instant: bool = False) -> Panel:
    """A Prometheus query; `exemplar` asks Grafana to draw exemplars (trace links)."""
    target: Panel = {"datasource": PROMETHEUS, "expr": expr, "legendFormat": legend}
    if exemplar:
        target["exemplar"] = True
    if instant:
        target.update(instant=True, range=False, format="table")
    return target


def traceql(query: str, limit: int = 20) -> Panel:
    """A Tempo TraceQL search, shown as a table of traces (each opens the trace view)."""
    return {
        "datasource": TEMPO,
        "queryType": "traceql",
        "query": query,
        "limit": limit,
        "tableType": "traces",
    }


def panel(
    title: str,
    question: str,
    targets: list[Panel],
    *,
    unit: str = "short",
    kind: str = "timeseries",
    width: int = 12,
    height: int = 8,
    **extra: Any,
) -> Panel:
    """A panel: its question is the description; targets get refIds A, B, C..."""
    datasource = targets[0]["datasource"]
    for i, target in enumerate(targets):
        target["refId"] = chr(ord("A") + i)
    options: Panel = {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }
    return {
        "type": kind,
        "title": title,
        "description": question,
        "datasource": datasource,
        "targets": targets,
        "gridPos": {"w": width, "h": height},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": options,
        **extra,
    }


def row(title: str, question: str) -> Panel:
    return {
        "type": "row",
        "title": title,
        "description": question,
        "collapsed": False,
        "panels": [],
        "gridPos": {"w": 24, "h": 1},
    }


def quantiles(
    metric: str, by: str, selector: str, qs: tuple[float, ...], exemplar: bool = False
) -> list[Panel]:
    """histogram_quantile targets of `metric`_bucket, one per quantile, grouped `by`."""
    return [
        prom(
            f"histogram_quantile({q}, sum by (le, {by}) "
            f"(rate({metric}_bucket{{{selector}}}{RATE})))",
            f"p{round(q * 100)} {{{{{by}}}}}",
            exemplar=exemplar,
        )
        for q in qs
    ]


def rate(metric: str, by: str, selector: str = UP, scale: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}{RATE})){scale}"


BREAKER_STATES = {
    "0": ("closed", "green"),
    "1": ("half-open", "yellow"),
    "2": ("open", "red"),
}
BREAKER_MAPPINGS = [
    {
        "type": "value",
        "options": {
            value: {"text": text, "color": color, "index": i}
            for i, (value, (text, color)) in enumerate(BREAKER_STATES.items())
        },
    }
]

CALLS = "tether_calls_total"
FAILED = f'{UP}, outcome=~"error|refused"'
# Every upstream with traffic gets a line: 0 where nothing failed (the `or ... * 0` branch).
ERROR_RATIO = (
    f"({rate(CALLS, 'upstream', FAILED)} or {rate(CALLS, 'upstream')} * 0)"
    f" / clamp_min({rate(CALLS, 'upstream')}, 1e-9)"
)
IN_DOUBT = f"sum by (upstream) (increase(tether_journal_in_doubt_total{{{UP}}}[$__range]))"


def overview_panels() -> list[Panel]:
    lat = "gen_ai_client_operation_duration_seconds"
    return [
        row("Traffic", "Is each upstream answering, how fast and how often?"),
        panel(
            "Request rate",
            "How many calls per second is each upstream taking?",
            [prom(rate(CALLS, "upstream"), "{{upstream}}")],
            unit="reqps",
        ),
        panel(
            "Error ratio",
            "What share of each upstream's calls fail or are refused by a policy?",
            [prom(ERROR_RATIO, "{{upstream}}")],
            unit="percentunit",
        ),
        panel(
            "Calls by outcome",
            "How do calls end: ok, error, replayed from the journal, or refused?",
            [prom(rate(CALLS, "outcome"), "{{outcome}}")],
            unit="reqps",
        ),
        panel(
            "Latency p50 / p95 / p99",
            "How long do calls take per upstream, and which trace caused a spike? "
            "(click an exemplar to open its trace in Tempo)",
            quantiles(lat, "tether_upstream", GENAI_UP, (0.5, 0.95, 0.99), exemplar=True),
            unit="s",
        ),
        row("Policies", "Which protections are acting, and on which upstream?"),
        panel(
            "Breaker state",
            "Is an upstream's circuit breaker closed, half-open or open, and since when?",
            [prom(f"max by (upstream) (tether_breaker_state{{{UP}}})", "{{upstream}}")],
            kind="state-timeline",
            width=24,
            fieldConfig={
                "defaults": {
                    "unit": "none",
                    "mappings": BREAKER_MAPPINGS,
                    "color": {"mode": "thresholds"},
                },
                "overrides": [],
            },
            options={
                "showValue": "never",
                "mergeValues": True,
                "rowHeight": 0.8,
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            },
        ),
        panel(
            "Rate-limit rejections",
            "Which upstreams refuse calls at their rate limit, how often?",
            [prom(rate("tether_rate_limit_rejections_total", "upstream"), "{{upstream}}")],
            unit="reqps",
        ),
        panel(
            "Rate-limit wait p50 / p95",
            "How long do calls wait for a rate-limit slot?",
            quantiles("tether_rate_limit_wait_seconds", "upstream", UP, (0.5, 0.95)),
            unit="s",
        ),
        panel(
            "Retries and retry budget",
            "How often are attempts retried and why, and when does the retry budget run out?",
            [
                prom(rate("tether_retries_total", "upstream, reason"), "{{upstream}} {{reason}}"),
                prom(
                    rate("tether_retry_budget_exhausted_total", "upstream"),
                    "{{upstream}} budget exhausted",
                ),
            ],
            unit="ops",
        ),
        panel(
            "Fallbacks",
            "How often does the next upstream in `fallback` answer instead, and why?",
            [prom(rate("tether_fallbacks_total", "upstream, reason"), "{{upstream}} {{reason}}")],
            unit="ops",
        ),
        panel(
            "Bulkhead in flight and queued",
            "Are calls piling up in front of an upstream?",
            [
                prom(
                    f"sum by (upstream) (tether_bulkhead_in_flight{{{UP}}})",
                    "{{upstream}} in flight",
                ),
                prom(f"sum by (upstream) (tether_bulkhead_queued{{{UP}}})", "{{upstream}} queued"),
            ],
        ),
        panel(
            "Bulkhead rejections",
            "Which upstreams shed load because their bulkhead was full?",
            [prom(rate("tether_bulkhead_rejections_total", "upstream"), "{{upstream}}")],
            unit="reqps",
        ),
        row("Usage and cost", "What are the agents consuming?"),
        panel(
            "Tokens per minute",
            "How many input and output tokens per minute does each upstream use?",
            [
                prom(
                    rate(
                        "gen_ai_client_token_usage_sum",
                        "tether_upstream, gen_ai_token_type",
                        GENAI_UP,
                        " * 60",
                    ),
                    "{{tether_upstream}} {{gen_ai_token_type}}",
                )
            ],
        ),
        panel(
            "Cost per hour",
            "What do the calls cost, in US dollars per hour (configured prices)?",
            [
                prom(
                    rate("tether_cost_usd_total", "upstream, gen_ai_request_model", UP, " * 3600"),
                    "{{upstream}} {{gen_ai_request_model}}",
                )
            ],
            unit="currencyUSD",
        ),
        row("Journal", "Is the journal saving work, and does anything need a human?"),
        *journal_panels(),
        row("The sidecar itself", "What does Tether cost, and is its telemetry healthy?"),
        panel(
            "Sidecar overhead p50 / p99",
            "What time does the sidecar add to a call, outside the upstream and retry "
            "backoff (queueing for rate-limit and bulkhead slots included)?",
            quantiles("tether_overhead_seconds", "upstream", UP, (0.5, 0.99)),
            unit="s",
        ),
        panel(
            "Shared stores",
            "Are the stores shared with other sidecars answering (Redis state, PostgreSQL "
            "journal), and how many decisions are made without them?",
            [
                prom(
                    'min by (store) (tether_store_up{store=~".+"})', "{{store}} up (1) / down (0)"
                ),
                prom(
                    rate("tether_store_fallbacks_total", "store, policy"),
                    "{{store}} {{policy}}: decided without the store /s",
                ),
            ],
            width=12,
        ),
        panel(
            "Telemetry spans dropped",
            "Is trace export losing spans (collector slow or down)?",
            [prom(f"sum(rate(tether_telemetry_spans_dropped_total{RATE}))", "dropped")],
            unit="ops",
            width=6,
        ),
        panel(
            "Build",
            "Which Tether version, on which Python, is running?",
            [prom("tether_build_info", "{{version}}", instant=True)],
            kind="table",
            width=6,
            transformations=[
                {
                    "id": "organize",
                    "options": {"excludeByName": {"Time": True, "Value": True, "__name__": True}},
                }
            ],
        ),
    ]


def journal_panels() -> list[Panel]:
    return [
        panel(
            "Journal replays",
            "How many calls per second are answered from the journal?",
            [prom(rate("tether_journal_replays_total", "upstream"), "{{upstream}}")],
            unit="reqps",
        ),
        panel(
            "In-doubt calls",
            "Which calls were refused as outcome unknown (see `tether runs "
            "resolve`) in the dashboard's time range?",
            [prom(IN_DOUBT, "{{upstream}}")],
            kind="stat",
            options={
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "background",
                "textMode": "value_and_name",
            },
            fieldConfig={
                "defaults": {
                    "unit": "short",
                    "thresholds": {
                        "mode": "absolute",
                        "steps": [{"color": "green", "value": None}, {"color": "red", "value": 1}],
                    },
                },
                "overrides": [],
            },
        ),
    ]


def runs_panels() -> list[Panel]:
    run = '{ span."gen_ai.conversation.id" = "$run_id" }'
    sidecar = '{ resource.service.name = "$service" }'
    failed = '{ resource.service.name = "$service" && status = error }'
    return [
        panel(
            "Traces of the run",
            "Which traces belong to run $run_id? Open one to see each "
            "call, attempt, retry and replay of the run.",
            [traceql(run, 100)],
            kind="table",
            width=24,
            height=10,
        ),
        panel(
            "Recent traces",
            "What did the sidecar handle most recently?",
            [traceql(sidecar)],
            kind="table",
        ),
        panel(
            "Recent failed calls",
            "Which recent calls failed, and with what error?",
            [traceql(failed)],
            kind="table",
        ),
        *journal_panels(),
    ]


def layout(panels: list[Panel]) -> list[Panel]:
    """Unique ids and left-to-right, top-to-bottom positions."""
    x = y = height = 0
    for number, p in enumerate(panels, start=1):
        pos = p["gridPos"]
        if x + pos["w"] > 24:
            x, y, height = 0, y + height, 0
        pos.update(x=x, y=y)
        p["id"] = number
        x, height = x + pos["w"], max(height, pos["h"])
    return panels


UPSTREAM_VARIABLE = {
    "name": "upstream",
    "label": "Upstream",
    "type": "query",
    "datasource": PROMETHEUS,
    "query": "label_values(tether_calls_total, upstream)",
    "definition": "label_values(tether_calls_total, upstream)",
    "multi": True,
    "includeAll": True,
    "allValue": ".*",
    "refresh": 2,
    "sort": 1,
    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    "options": [],
    "hide": 0,
    "regex": "",
}
SERVICE_VARIABLE = {  # OTEL_SERVICE_NAME of the sidecar, as its traces say
    "name": "service",
    "label": "Sidecar service name",
    "type": "textbox",
    "query": "tether-sidecar",
    "current": {"text": "tether-sidecar", "value": "tether-sidecar"},
    "hide": 0,
}
RUN_ID_VARIABLE = {
    "name": "run_id",
    "label": "Run id",
    "type": "textbox",
    "query": "",
    "current": {"text": "", "value": ""},
    "hide": 0,
}


def dashboard(
    uid: str, title: str, description: str, panels: list[Panel], variables: list[Panel]
) -> Panel:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["tether"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "timezone": "",
        "links": [
            {
                "title": "Tether dashboards",
                "type": "dashboards",
                "tags": ["tether"],
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "templating": {"list": variables},
        "annotations": {"list": []},
        "panels": layout(panels),
    }


def dashboards() -> dict[str, Panel]:
    """File name -> dashboard."""
    return {
        "tether-overview.json": dashboard(
            "tether-overview",
            "Tether overview",
            "Golden signals of the Tether sidecar: traffic, errors, latency, policies, cost.",
            overview_panels(),
            [dict(UPSTREAM_VARIABLE)],
        ),
        "tether-runs.json": dashboard(
            "tether-runs",
            "Tether runs",
            "One agent run: its traces in Tempo (by gen_ai.conversation.id) and its journal.",
            runs_panels(),
            [dict(RUN_ID_VARIABLE), dict(SERVICE_VARIABLE), dict(UPSTREAM_VARIABLE)],
        ),
    }


def render() -> dict[Path, str]:
    """Path -> the exact text to write."""
    return {HERE / name: json.dumps(d, indent=2) + "\n" for name, d in dashboards().items()}


def markdown() -> str:
    """A table of every panel and the question it answers (for the README)."""
    lines = ["| Dashboard | Panel | What it answers |", "| --- | --- | --- |"]
    for d in dashboards().values():
        for p in d["panels"]:
            if p["type"] != "row":
                lines.append(f"| {d['title']} | {p['title']} | {p['description']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if "--markdown" in argv:
        print(markdown())
        return 0
    stale = [
        path
        for path, text in render().items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    ]
    if "--check" in argv:
        for path in stale:
            print(f"{path.name} is stale: run python dashboards/generate.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in render().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
