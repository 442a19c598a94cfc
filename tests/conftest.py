"""Shared test fixtures: clean global state, and the policy for tests that need services."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.postgres_support import JournalBackend

pytest_plugins = ["tests.skip_policy"]

REQUIRE_SERVICES = os.environ.get("TETHER_REQUIRE_SERVICES") == "1"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every test starts without the SDK's and sidecar's environment variables, in an empty
    working directory (relative paths, such as the default journal file, land there)."""
    for name in ("TETHER_ADDRESS", "TETHER_TOKEN", "TETHER_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


def require_service(name: str, available: bool, why: str) -> None:
    """Skip when a service is missing, unless TETHER_REQUIRE_SERVICES=1 makes that a failure."""
    if available:
        return
    if REQUIRE_SERVICES:
        pytest.fail(f"{name} is required (TETHER_REQUIRE_SERVICES=1) but unavailable: {why}")
    pytest.skip(f"{name} unavailable: {why}")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def journal_backend(request: pytest.FixtureRequest) -> Iterator[JournalBackend]:
    """The journal store a journal test runs on: SQLite, then PostgreSQL on a schema of the
    test's own (skipped without PostgreSQL, unless TETHER_REQUIRE_SERVICES=1). Pin one with
    `@pytest.mark.parametrize("journal_backend", ["sqlite"], indirect=True)`."""
    from tests.postgres_support import journal_backend as backend

    with backend(request.param) as chosen:
        yield chosen
