"""The `tether` command line: check-config, demo, status, and secrets kept out of output."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

import tether
from sidecar.cli import main
from tests.conftest import ROOT
from tests.e2e.processes import start_sidecar, stop, write_config
from tests.integration.support import LoopThread, UpstreamApp, serve_app

BAD_CONFIGS = {
    "unknown type": ("upstreams:\n  x: {kind: tool, type: ftp}\n", "upstreams.x.type"),
    "missing url": ("upstreams:\n  s: {kind: tool, type: http}\n", "upstreams.s.url"),
    "negative timeout": (
        "upstreams:\n  m: {kind: model, type: mock, timeout_s: -2}\n",
        "upstreams.m.timeout_s",
    ),
    "unknown key": ("limits:\n  max_payload: 10\n", "limits.max_payload"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_check_config_rejects_with_field_path(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each bad config exits 2 and names the field at fault."""
    text, field = BAD_CONFIGS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{field}:" in err


def test_check_config_process_exit_codes(tmp_path: Path) -> None:
    """As a process: ok and exit 0 for a good file, exit 2 for a bad one."""
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text("upstreams:\n  m: {kind: model, type: mock}\n")
    bad.write_text("upstreams:\n  m: {kind: model, type: mock, latency_ms: -1}\n")
    command = [sys.executable, "-m", "sidecar", "check-config"]
    ok = subprocess.run([*command, str(good)], capture_output=True, text=True)
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok")
    failed = subprocess.run([*command, str(bad)], capture_output=True, text=True)
    assert failed.returncode == 2 and "upstreams.m.latency_ms" in failed.stderr


def test_check_config_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    """A file that cannot be read is a clear error, exit 2."""
    assert main(["check-config", "/nonexistent/tether.yaml"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_check_config_warns_of_unset_header_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check-config warns, naming field and variable, when a headers_env variable is unset."""
    monkeypatch.delenv("TT_HDR_NOPE", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text(
        "upstreams:\n  s: {type: http, url: 'http://127.0.0.1:1', "
        "headers_env: {X-Api-Key: TT_HDR_NOPE}}\n"
    )
    assert main(["check-config", str(path)]) == 0
    err = capsys.readouterr().err
    assert "upstreams.s.headers_env.X-Api-Key: environment variable TT_HDR_NOPE" in err


def test_serve_with_missing_secret_exits_2(tmp_path: Path) -> None:
    """serve refuses a config whose secret variable is unset, naming the variable."""
    path = tmp_path / "c.yaml"
    path.write_text(
        "listen: {grpc: 'unix:" + str(tmp_path) + "/t.sock', metrics: null}\n"
        "upstreams:\n  llm: {type: openai, base_url: 'http://127.0.0.1:1', api_key_env: TT_NOPE}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "serve", "--config", str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2 and "TT_NOPE" in proc.stderr


def test_demo_runs_end_to_end() -> None:
    """`tether demo` runs the agent through an outage: the breaker opens, the fallback answers,
    the breaker closes again; the sidecar stops cleanly."""
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "demo"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "== summary:" in out
    assert re.search(r"llm breaker over the run: closed -> open( -> half_open)?.* -> closed", out)
    assert re.search(r"llm -> llm-backup: \d+", out)
    assert "sidecar drained and stopped (exit code 0)" in out
    assert re.search(r'tether_calls_total\{.*upstream="llm"\} \d+', out)  # metrics were served
    assert "docker compose up" in out
    assert "== an unchanged OpenAI-client agent" in out  # the third act, through the HTTP front
    assert re.search(r"question 0: answered by llm \(attempts 1", out)
    # the fourth act: killed at step 4, resumed with steps 1-3 answered from the journal
    assert "step 4: crashing (SIGKILL)" in out
    assert "run instrumented-demo complete: 3 steps replayed, 3 executed" in out
    # the fifth act: a stream cut half-way, replayed into the whole answer once
    assert "the same as an uncut answer, word for word, once: True" in out
    assert re.search(
        r'tether_stream_recoveries_total\{outcome="replayed",upstream="llm-cut"\} 1', out
    )


def test_top_once(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tether top --once` prints each upstream's rates and breaker from a running sidecar."""
    config, address = write_config(short_tmp, {"m1": {"kind": "model", "type": "mock"}})
    proc = start_sidecar(config, address)
    try:
        assert main(["top", "--address", address, "--once", "--interval-s", "0.1"]) == 0
    finally:
        assert stop(proc) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("m1 "))
    assert row.split()[:2] == ["m1", "ok"]  # the breaker, closed
    assert "req/s" in out and "Σretry" in out and "Σ: totals since start" in out


def test_status_command(short_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tether status` prints each upstream of a running sidecar."""
    config, address = write_config(short_tmp, {"m1": {"kind": "model", "type": "mock"}})
    proc = start_sidecar(config, address)
    try:
        assert main(["status", "--address", address]) == 0
        assert "m1" in capsys.readouterr().out
    finally:
        assert stop(proc) == 0
    assert main(["status", "--address", address, "--timeout-s", "1"]) == 1


def test_api_key_never_in_errors_or_logs(short_tmp: Path) -> None:
    """The API key reaches the upstream but never the caller's error or the sidecar's logs."""
    secret = "sk-test-DO-NOT-LEAK-1234567890"
    loop = LoopThread()
    app = UpstreamApp()
    loop.run(app.start())
    try:
        upstreams = {"llm": {"type": "openai", "base_url": f"{app.url}/echo-auth",
                             "api_key_env": "TT_API_KEY"}}  # fmt: skip
        config, address = write_config(short_tmp, upstreams)
        log = short_tmp / "sidecar.log"
        proc = start_sidecar(config, address, env={"TT_API_KEY": secret}, log=log)
        with tether.Client(address) as client, pytest.raises(tether.UpstreamClientError) as info:
            client.model("llm", {"model": "m", "messages": []})
        assert stop(proc) == 0
    finally:
        loop.run(app.stop())
        loop.stop()
    assert app.seen[0].headers["Authorization"] == f"Bearer {secret}"
    err = info.value
    assert err.http_status == 401
    assert secret not in err.message and secret not in err.body and secret not in str(err.metadata)
    assert "Incorrect API key provided" in err.message
    assert secret not in log.read_text()


def test_busy_tcp_port_exits_1_with_one_line(tmp_path: Path) -> None:
    """serve on a TCP port another socket holds exits 1 with a one-line error, no traceback."""
    path = tmp_path / "c.yaml"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path.write_text(
            f"listen: {{grpc: '127.0.0.1:{port}', metrics: null}}\n"
            "upstreams:\n  m: {kind: model, type: mock}\n"
        )
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar", "serve", "--config", str(path)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"tether: cannot listen on 127.0.0.1:{port}: ")


class HeaderEcho:
    """A real upstream that refuses every call with 401, quoting the credentials it got."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def refuse(self, request: web.Request) -> web.Response:
        self.seen.append(dict(request.headers))
        quoted = {name: request.headers.get(name, "") for name in ("Authorization", "X-Api-Key")}
        error = {"error": {"message": f"Invalid credentials: {quoted}"}}
        return web.Response(status=401, body=orjson.dumps(error), content_type="application/json")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.refuse)
        app.router.add_post("/tool", self.refuse)
        self.runner, port = await serve_app(app)
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.mark.parametrize("kind", ["openai", "http"])
def test_secret_headers_arrive_but_never_leak(short_tmp: Path, kind: str) -> None:
    """headers_env values (like the API key) reach the upstream as headers, trimmed, but never
    the caller's error or the sidecar's logs."""
    api_key, header_secret = "sk-test-DO-NOT-LEAK-1234567890", "hdr-DO-NOT-LEAK-0987654321"
    loop, app = LoopThread(), HeaderEcho()
    loop.run(app.start())
    secrets: dict[str, Any] = {"api_key_env": "TT_API_KEY", "headers": {"X-Org": "acme"},
                               "headers_env": {"X-Api-Key": "TT_HEADER_KEY"}}  # fmt: skip
    upstreams = {
        "openai": {"llm": {"type": "openai", "base_url": f"{app.url}/v1", **secrets}},
        "http": {"llm": {"type": "http", "kind": "model", "url": f"{app.url}/tool", **secrets}},
    }[kind]
    env = {"TT_API_KEY": api_key, "TT_HEADER_KEY": header_secret + "\n"}
    try:
        config, address = write_config(short_tmp, upstreams)
        log = short_tmp / "sidecar.log"
        proc = start_sidecar(config, address, env=env, log=log)
        with tether.Client(address) as client, pytest.raises(tether.UpstreamClientError) as info:
            client.model("llm", {"model": "m", "messages": []})
        assert stop(proc) == 0
    finally:
        loop.run(app.stop())
        loop.stop()
    headers = app.seen[0]
    assert (headers["X-Api-Key"], headers["X-Org"]) == (header_secret, "acme")
    assert headers["Authorization"] == f"Bearer {api_key}"
    err = info.value
    assert err.http_status == 401 and "Invalid credentials" in err.message
    assert err.message.count("***") == 2  # both were quoted back, both redacted
    for secret in (api_key, header_secret):
        assert secret not in err.message and secret not in err.body
        assert secret not in str(err.metadata)
        assert secret not in log.read_text()
