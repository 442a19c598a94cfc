"""The benchmark harness's pure parts: targets, the RESULTS.md section, profile summaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.plan import make_plan
from bench.profile import NATIVE_LOOP, summarize
from bench.report import BEGIN, END, floor_table, results_table, update_results_md
from bench.runner import percentile
from bench.targets import evaluate


def row(p50: float, calls_per_s: float = 1000.0, cpu: float | None = None) -> dict[str, Any]:
    found: dict[str, Any] = {
        "latency_ms": {"p50": p50, "p90": p50, "p99": p50 * 2},
        "calls_per_s": calls_per_s,
    }
    if cpu is not None:
        found |= {"cpu_ms_per_call": cpu, "peak_rss_mb": 60.0}
    return found


def result(**extra: Any) -> dict[str, Any]:
    scenarios = {
        "c1": {
            "systems": {
                "direct": row(0.3),
                "tether-grpc": row(0.7, cpu=0.3),
                "tether-http": row(1.0, cpu=0.3),
                "litellm": row(13.3, cpu=12),
            }
        },
        "c32": {
            "systems": {
                "direct": row(4, 8000),
                "tether-grpc": row(10, 2500, cpu=0.35),
                "tether-http": row(12, 2100, cpu=0.45),
                "litellm": row(330, 95, cpu=12),
            }
        },
    }
    startup = {"tether-main": {"first_call_s": 0.9}, "litellm": {"first_call_s": 7.0}}
    return {"scenarios": scenarios, "fsync_ms": {"p50": 0.2}, "startup": startup, **extra}


def with_floor() -> dict[str, Any]:
    """`result()` with the transport floor measured in c1 and c32."""
    found = result()
    for key, scenario in found["scenarios"].items():
        scenario |= {"concurrency": 1 if key == "c1" else 32, "stream": False, "title": key}
    c1, c32 = found["scenarios"]["c1"]["systems"], found["scenarios"]["c32"]["systems"]
    c1 |= {"floor-grpc": row(0.5, cpu=0.15), "floor-http": row(0.45, cpu=0.1)}
    c32 |= {"floor-grpc": row(6, 4000, cpu=0.2), "floor-http": row(5, 5000, cpu=0.09)}
    for system in (*c1.values(), *c32.values()):
        system |= {"calls": 100, "errors": {}}
    return found


def status(rows: list[dict[str, Any]], target: str, system: str) -> str:
    return next(r["status"] for r in rows if r["target"] == target and r["system"] == system)


def test_targets_pass_miss_and_unmeasured() -> None:
    """Each target is PASS or MISS against its limit, and n/a when its scenario did not run."""
    rows = evaluate(result())
    assert status(rows, "added p50 at c=1, journal off", "tether-grpc") == "PASS"  # +0.4 ms
    assert status(rows, "added p50 at c=1, journal off", "tether-http") == "MISS"  # +0.7 ms
    assert status(rows, "sidecar CPU per call (c=32)", "tether-http") == "MISS"
    assert status(rows, "calls/s at c=32, journal FULL", "tether-grpc") == "n/a"
    assert status(rows, "start-up to first served call", "tether") == "PASS"


def test_targets_against_litellm() -> None:
    """Ratios against LiteLLM: added latency and CPU divided, throughput multiplied."""
    rows = evaluate(result())
    assert status(rows, "vs LiteLLM: added p50 at c=1", "tether-grpc") == "PASS"  # 13 / 0.4
    assert status(rows, "vs LiteLLM: calls/s at c=32", "tether-grpc") == "PASS"  # 2500 / 95
    assert status(rows, "vs LiteLLM: start-up", "tether") == "MISS"  # 7.0 / 0.9


def test_memory_target_needs_flat_quarters() -> None:
    """RSS that grows more than 5% from the second to the last quarter is a MISS."""
    growing = {"calls": 100_000, "peak_rss_mb": 80.0, "rss_quarters_mb": [60, 62, 66, 70]}
    flat = {**growing, "rss_quarters_mb": [60, 62, 62.5, 62.4]}
    assert (
        status(evaluate(result(memory=growing)), "RSS flat (Q2 -> Q4 growth)", "tether") == "MISS"
    )
    assert status(evaluate(result(memory=flat)), "RSS flat (Q2 -> Q4 growth)", "tether") == "PASS"


def test_results_md_section_replaced_and_old_sections_kept(tmp_path: Path) -> None:
    """The generated section goes after the introduction; a new run replaces only it."""
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\nIntro.\n\n## Old run\n\nold figures\n")
    update_results_md(path, "## Harness run 1")
    update_results_md(path, "## Harness run 2")
    text = path.read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1
    assert "run 1" not in text
    assert text.index("Intro.") < text.index("## Harness run 2") < text.index("## Old run")
    assert text.endswith("old figures\n")


def test_profile_summary_by_area_and_function() -> None:
    """py-spy's collapsed stacks become self-time shares per area and per function."""
    raw = (
        "Thread._bootstrap (/py/threading.py:1);SQLiteJournal._run (/x/sidecar/journal/sqlite.py:9)"
        ";_write (/x/sidecar/journal/sqlite.py:5) 30\n"
        "call (/x/sidecar/service.py:10);export (/x/site-packages/opentelemetry/e.py:1) 6\n"
        "Runner.run (/py/asyncio/runners.py:118) 4\n"
    )
    found = summarize(raw)
    assert found["samples"] == 40
    assert dict(found["by_role"]) == {"journal writer thread": 75.0, "event loop thread": 25.0}
    assert dict(found["self_by_area"]) == {
        "sidecar journal": 75.0,
        "opentelemetry SDK": 15.0,
        NATIVE_LOOP: 10.0,
    }
    assert dict(found["inclusive_sidecar"])["call (sidecar/service.py)"] == 15.0


def test_quick_plan_is_smaller_and_calls_override() -> None:
    """Quick mode has no LiteLLM, memory run or profile; --calls sets every scenario's calls."""
    quick = make_plan(quick=True, with_litellm=False, calls=50)
    full = make_plan(quick=False, with_litellm=True)
    assert len(quick.scenarios) < len(full.scenarios)
    assert quick.memory_calls == 0 and quick.profile_s == 0 and full.memory_calls == 100_000
    assert "litellm" not in quick.systems() and "litellm" in full.systems()
    assert all(s.calls == max(50, 2 * s.concurrency) for s in quick.scenarios)


def test_percentile_nearest_rank() -> None:
    """Nearest-rank percentiles of a small sample."""
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([3.0], 90) == 3


def test_floor_table_next_to_tether_and_absent_from_old_runs() -> None:
    """The transport floor's added p50 at c=1 and CPU per call at c=32 stand next to Tether's
    on the same transport with the floor's share; a run without the floor renders none."""
    found = with_floor()
    table = floor_table(found)
    assert "| gRPC | floor-grpc vs tether-grpc | +0.20 / +0.40 ms | 50% | 0.20 / 0.35 | 57% |" in (
        table
    )
    assert "| HTTP | floor-http vs tether-http | +0.15 / +0.70 ms | 21% | 0.09 / 0.45 | 20% |" in (
        table
    )
    assert floor_table(result()) == ""
    # the floor is no target, and gets no LiteLLM ratio in the results table
    assert {r["system"] for r in evaluate(found)} == {"tether-grpc", "tether-http", "tether"}
    floor_rows = [line for line in results_table(found).splitlines() if "| floor-" in line]
    assert len(floor_rows) == 4
    assert all(line.split(" | ")[9] == "-" for line in floor_rows)
