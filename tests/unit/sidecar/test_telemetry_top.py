"""`tether top` outlives the sidecar and the metrics URL going away: the view says what
failed, keeps the last good reading, and the loop goes on."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

import tether
from sidecar.server import SidecarServer, create_server
from sidecar.top import Reading, read, run_top, view
from tests.integration.support import LoopThread, sidecar_config


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/metrics"


class GoneClient:
    def status(self) -> tether.Status:
        raise tether.SidecarUnavailableError("the sidecar is not there")


def render(group: Any) -> str:
    console = Console(width=200, record=True)
    console.print(group)
    return console.export_text()


def test_a_failed_reading_is_shown_not_raised() -> None:
    now = read(GoneClient(), closed_port_url())  # type: ignore[arg-type]
    assert now.status is None
    assert "sidecar: the sidecar is not there" in now.error
    assert "metrics http://127.0.0.1:" in now.error
    status = tether.Status("1.0", "v1", True, 1.0, 0, {})
    last = Reading(now.at - 3, status)
    text = render(view(now, last))
    assert "trying again" in text and "last reading, 3 s ago" in text


def test_the_live_view_outlives_the_sidecar(short_tmp: Path) -> None:
    loop = LoopThread()
    sock = str(short_tmp / "s.sock")
    config = sidecar_config(sock, {"m": {"kind": "model", "type": "mock"}})

    async def start() -> SidecarServer:
        server, _ = await create_server(config)
        await server.start()
        return server

    server = loop.run(start())
    outcome: list[Any] = []

    def top() -> None:
        try:
            outcome.append(run_top(f"unix:{sock}", closed_port_url(), 0.05, False, updates=20))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=top)
    try:
        thread.start()
        time.sleep(0.3)
    finally:
        loop.run(server.drain(0.1))
        loop.stop()
    thread.join(30)
    assert outcome == [0]


def test_the_view_fits_80_columns_and_marks_totals() -> None:
    """At 80 columns every line fits, each upstream's row is there (a long name folds), rates
    and totals are told apart (Σ and the legend)."""
    import io

    from rich.console import Console

    from tether._messages import Status, UpstreamStatus

    def upstream(name: str, calls: int) -> UpstreamStatus:
        return UpstreamStatus(name, "model", "openai", "open", 3, calls, calls // 100, 0,
                              {"retry.budget_left": 12.0}, queued=1, retries=40, fallbacks=7,
                              rejected=2)  # fmt: skip

    def status(calls: int) -> Status:
        names = ("llm", "openai/gpt-4o-mini", "search")
        return Status("0.1.0", "abc", True, 1.0, 3, {n: upstream(n, calls) for n in names})

    before, now = Reading(0.0, status(1000)), Reading(2.0, status(3000))
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=False).print(view(now, before))
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 80 for line in lines)
    header = next(line for line in lines if line.startswith("upstream"))
    assert header.split() == ["upstream", "state", "req/s", "err/s", "p50", "p99", "busy",
                              "Σretry", "Σfallbk", "Σrefuse", "budget"]  # fmt: skip
    llm = next(line for line in lines if line.startswith("llm "))
    assert llm.split() == ["llm", "OPEN", "1000", "10.0", "-", "-", "3+1", "40", "7", "2", "12"]
    assert "Σ: totals since start" in " ".join(lines)
