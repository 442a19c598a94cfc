"""`tether status`: one readable row per upstream, its hits included."""

from __future__ import annotations

from typing import Any

import pytest

import tether
from sidecar.cli import main
from tether._messages import Status, UpstreamStatus


class FakeClient:
    def __init__(self, *args: Any, **kwargs: Any) -> None: ...

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc_info: object) -> None: ...

    def status(self) -> Status:
        gauges = {"breaker.failures": 2.0, "retry.budget_left": 1.5,
                  "rate_limit.requests_available": 4.0}  # fmt: skip
        up = UpstreamStatus("llm", "model", "openai", "closed", in_flight=1, calls=7, errors=3,
                            hits=11, gauges=gauges, queued=0, retries=4, fallbacks=1,
                            rejected=2)  # fmt: skip
        return Status("1.0", "abc", True, 12.0, 1, {"llm": up})


def test_status_table_has_a_hits_column(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """HITS sits beside CALLS, under its header, with the upstream's count."""
    monkeypatch.setattr(tether, "Client", FakeClient)
    assert main(["status", "--address", "unix:nowhere.sock"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, row = lines[1].split(), lines[2].split()
    assert header[:10] == ["UPSTREAM", "KIND", "TYPE", "BREAKER", "FAILS", "INFL", "QUEUED",
                           "CALLS", "HITS", "ERRORS"]  # fmt: skip
    assert row[:10] == ["llm", "model", "openai", "closed", "2", "1", "0", "7", "11", "3"]
    assert row[10:14] == ["4", "1.5", "1", "2"] and lines[2].endswith("req 4.0")
