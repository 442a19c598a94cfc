"""The suite's skip policy (tests/skip_policy.py), run on a small suite of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SUITE = """
import pytest

def test_runs():
    assert True

def test_needs_a_service():
    pytest.skip("redis unavailable: no Redis at 127.0.0.1:1")
"""


def run_suite(tmp_path: Path, *, require: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_small.py").write_text(SUITE)
    env = {k: v for k, v in os.environ.items() if k != "TETHER_REQUIRE_SERVICES"}
    if require:
        env["TETHER_REQUIRE_SERVICES"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "-m", "pytest", "-p", "tests.skip_policy", "-p", "no:cacheprovider",
               "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path)]  # fmt: skip
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("require", [False, True])
def test_a_skip_fails_the_run_only_when_services_are_required(
    tmp_path: Path, require: bool
) -> None:
    """A skipped test leaves the run green, but fails it under TETHER_REQUIRE_SERVICES=1 and
    names the test that skipped."""
    result = run_suite(tmp_path, require=require)
    assert "1 passed, 1 skipped" in result.stdout
    if require:
        assert result.returncode == 1, result.stdout
        assert "1 test(s) skipped, so this run fails" in result.stdout
        assert "test_small.py::test_needs_a_service" in result.stdout
    else:
        assert result.returncode == 0, result.stdout


def test_no_test_imports_a_locked_package_conditionally() -> None:
    """No `pytest.importorskip` in the suite: packages the lock installs are plain imports."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("*.py")
        if path.name != "test_skip_policy.py" and "importorskip(" in path.read_text()
    ]
    assert not offenders
