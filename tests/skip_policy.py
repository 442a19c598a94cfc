"""One skip policy for the whole suite: a test skips only when a service it needs (Redis,
PostgreSQL, Prometheus) is missing, and under TETHER_REQUIRE_SERVICES=1 (as `.ci/run` sets
it) a run that skipped anything fails, so a green CI means every test ran.

Packages that the lock installs are plain imports, never `pytest.importorskip`."""

from __future__ import annotations

import os

import pytest

_skipped: list[str] = []


def require_services() -> bool:
    return os.environ.get("TETHER_REQUIRE_SERVICES") == "1"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if require_services() and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if require_services() and _skipped:
        terminalreporter.write_line(
            f"TETHER_REQUIRE_SERVICES=1: {len(_skipped)} test(s) skipped, so this run fails: "
            + ", ".join(_skipped[:10]),
            red=True,
        )
