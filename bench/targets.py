"""The performance targets of issue 8, checked against one run's results: PASS, MISS or n/a.

Through the gRPC path and the HTTP front, policies and telemetry on:
- added p50 at c=1 over direct <= 0.5 ms (journal off); <= 0.5 ms + one fsync (journal FULL);
- sidecar CPU per call <= 0.4 ms (c=32, journal off);
- >= 2000 calls/s at c=32 with the journal on (FULL), p99 < 50 ms;
- peak RSS <= 100 MB under the 100,000-call run, and flat (second to last quarter);
- start-up to the first served call < 1.5 s;
- each of those at least 20x better than the LiteLLM proxy, when it was measured.
"""

from __future__ import annotations

import math
from typing import Any

from bench.plan import DIRECT, GRPC, HTTP, LITELLM

ADDED_P50_MS = 0.5
CPU_MS_PER_CALL = 0.4
CALLS_PER_S = 2000
P99_MS = 50
PEAK_RSS_MB = 100
FLAT_GROWTH = 0.05  # "flat": RSS after the last quarter at most 5% above the second's
STARTUP_S = 1.5
VS_LITELLM = 20
PASS, MISS, NA = "PASS", "MISS", "n/a"


def check(
    name: str, system: str, value: float | None, op: str, limit: float, unit: str
) -> dict[str, Any]:
    if value is None or math.isnan(value):
        status = NA
    elif op == "<=":
        status = PASS if value <= limit else MISS
    elif op == "<":
        status = PASS if value < limit else MISS
    else:
        status = PASS if value >= limit else MISS
    return {
        "target": name,
        "system": system,
        "value": value,
        "op": op,
        "limit": limit,
        "unit": unit,
        "status": status,
    }


def _get(result: dict[str, Any], key: str, system: str) -> dict[str, Any] | None:
    scenario = result["scenarios"].get(key)
    return None if scenario is None else scenario["systems"].get(system)


def added_p50_ms(result: dict[str, Any], key: str, system: str) -> float | None:
    """p50 latency of `system` minus that of direct calls in the same scenario, ms."""
    this, direct = _get(result, key, system), _get(result, key, DIRECT)
    if this is None or direct is None:
        return None
    return float(this["latency_ms"]["p50"] - direct["latency_ms"]["p50"])


def _field(result: dict[str, Any], key: str, system: str, *path: str) -> float | None:
    node: Any = _get(result, key, system)
    for part in path:
        if node is None:
            return None
        node = node.get(part)
    return None if node is None else float(node)


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target against `result`, one row per target and system."""
    rows = []
    fsync = result["fsync_ms"]["p50"]
    for system in (GRPC, HTTP):
        rows += [
            check(
                "added p50 at c=1, journal off",
                system,
                added_p50_ms(result, "c1", system),
                "<=",
                ADDED_P50_MS,
                "ms",
            ),
            check(
                "added p50 at c=1, journal FULL (0.5 ms + fsync)",
                system,
                added_p50_ms(result, "c1-jfull", system),
                "<=",
                ADDED_P50_MS + fsync,
                "ms",
            ),
            check(
                "sidecar CPU per call (c=32)",
                system,
                _field(result, "c32", system, "cpu_ms_per_call"),
                "<=",
                CPU_MS_PER_CALL,
                "ms",
            ),
            check(
                "calls/s at c=32, journal FULL",
                system,
                _field(result, "c32-jfull", system, "calls_per_s"),
                ">=",
                CALLS_PER_S,
                "1/s",
            ),
            check(
                "p99 at c=32, journal FULL",
                system,
                _field(result, "c32-jfull", system, "latency_ms", "p99"),
                "<",
                P99_MS,
                "ms",
            ),
        ]
    rows += _memory(result.get("memory"))
    main = result["startup"].get("tether-main", {})
    rows.append(
        check(
            "start-up to first served call", "tether", main.get("first_call_s"), "<", STARTUP_S, "s"
        )
    )
    if LITELLM in result["startup"]:
        rows += _versus_litellm(result)
    return rows


def _memory(memory: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not memory:
        return [
            check("peak RSS under 100k calls", "tether", None, "<=", PEAK_RSS_MB, "MB"),
            check("RSS flat (Q2 -> Q4 growth)", "tether", None, "<=", FLAT_GROWTH * 100, "%"),
        ]
    quarters = memory["rss_quarters_mb"]
    growth = 100 * (quarters[3] - quarters[1]) / quarters[1]
    title = f"peak RSS under {memory['calls']:,} calls"
    return [
        check(title, "tether", memory["peak_rss_mb"], "<=", PEAK_RSS_MB, "MB"),
        check("RSS flat (Q2 -> Q4 growth)", "tether", growth, "<=", FLAT_GROWTH * 100, "%"),
    ]


def _times(numerator: float | None, denominator: float | None) -> float | None:
    """`numerator / denominator`: how many times better (infinite when the denominator, an
    added latency, is zero or below within noise)."""
    if numerator is None or denominator is None:
        return None
    return math.inf if denominator <= 0 else numerator / denominator


def _versus_litellm(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    peak = max(
        (
            s.get("peak_rss_mb", 0)
            for sc in result["scenarios"].values()
            for name, s in sc["systems"].items()
            if name == LITELLM
        ),
        default=None,
    )
    tether_peak = (result.get("memory") or {}).get("peak_rss_mb") or max(
        (
            s.get("peak_rss_mb", 0)
            for sc in result["scenarios"].values()
            for name, s in sc["systems"].items()
            if name in (GRPC, HTTP)
        ),
        default=None,
    )
    litellm_tput = _field(result, "c32", LITELLM, "calls_per_s")
    startup = result["startup"]
    for system in (GRPC, HTTP):
        tput = _field(result, "c32", system, "calls_per_s")
        ratios = {
            "added p50 at c=1": _times(
                added_p50_ms(result, "c1", LITELLM), added_p50_ms(result, "c1", system)
            ),
            "CPU per call at c=32": _times(
                _field(result, "c32", LITELLM, "cpu_ms_per_call"),
                _field(result, "c32", system, "cpu_ms_per_call"),
            ),
            "calls/s at c=32": _times(tput, litellm_tput),
        }
        rows += [
            check(f"vs LiteLLM: {name}", system, value, ">=", VS_LITELLM, "x")
            for name, value in ratios.items()
        ]
    rows.append(
        check("vs LiteLLM: peak RSS", "tether", _times(peak, tether_peak), ">=", VS_LITELLM, "x")
    )
    main = startup.get("tether-main", {}).get("first_call_s")
    rows.append(
        check(
            "vs LiteLLM: start-up",
            "tether",
            _times(startup[LITELLM]["first_call_s"], main),
            ">=",
            VS_LITELLM,
            "x",
        )
    )
    return rows
