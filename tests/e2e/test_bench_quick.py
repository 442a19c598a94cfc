"""The benchmark harness runs end to end in a reduced quick mode and reports sane figures."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT

CALLS = 100
SCENARIOS = {"c1", "c1-jfull", "c1-stream", "c32", "c32-jfull"}
SYSTEMS = {"direct", "tether-grpc", "tether-http"}
FLOOR = {"floor-grpc", "floor-http"}  # the transport floor, in the unary journal-off scenarios
WITH_FLOOR = {"c1", "c32"}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    command = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--calls",
        str(CALLS),
        "--no-record",
        "--out",
        str(out),
    ]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=110)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "PASS" in run.stdout or "MISS" in run.stdout  # the targets table was printed
    loaded: dict[str, Any] = json.loads((out / "results.json").read_text())
    return loaded


@pytest.mark.timeout(120)
def test_quick_run_has_every_scenario_and_counts_every_call(result: dict[str, Any]) -> None:
    """Each quick scenario measured direct, gRPC and HTTP (c1 and c32 also the transport
    floor) with every call made and answered."""
    assert result["mode"] == "quick"
    assert set(result["scenarios"]) == SCENARIOS
    for key, scenario in result["scenarios"].items():
        assert set(scenario["systems"]) == SYSTEMS | (FLOOR if key in WITH_FLOOR else set())
        for row in scenario["systems"].values():
            assert row["calls"] == row["ok"] == CALLS, row
            assert row["errors"] == {}


@pytest.mark.timeout(120)
def test_quick_run_figures_are_sane(result: dict[str, Any]) -> None:
    """Percentiles are ordered, direct beats the proxies (the floor too) at c=1, proxies
    report CPU and RSS."""
    for scenario in result["scenarios"].values():
        for system, row in scenario["systems"].items():
            lat = row["latency_ms"]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
            assert row["calls_per_s"] > 0
            if scenario["stream"]:
                assert 0 < row["first_chunk_ms"]["p50"] <= lat["p50"]
            if system != "direct":
                cpu = row["cpu_ms_per_call"]
                # the floor takes ~0.1-0.5 ms a call: 100 may stay within one 10 ms CPU tick
                assert cpu > 0 or (system in FLOOR and cpu == 0)
                assert 10 < row["peak_rss_mb"] < 1000
    c1 = result["scenarios"]["c1"]["systems"]
    for proxied in ("tether-grpc", "tether-http", *FLOOR):
        assert c1["direct"]["latency_ms"]["p50"] < c1[proxied]["latency_ms"]["p50"]


@pytest.mark.timeout(120)
def test_quick_run_reports_startup_fsync_telemetry_and_targets(result: dict[str, Any]) -> None:
    """Start-up times, the disk's fsync cost, spans received and a status for every target."""
    assert 0 < result["startup"]["tether-main"]["first_call_s"] < 30
    assert 0 < result["startup"]["floor"]["first_call_s"] < 30
    assert result["fsync_ms"]["p50"] > 0
    assert result["otlp_spans"] > 0
    statuses = {row["status"] for row in result["targets"]}
    assert statuses <= {"PASS", "MISS", "n/a"}
    assert any(row["target"].startswith("added p50 at c=1") for row in result["targets"])
