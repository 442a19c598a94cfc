"""`tether demo`: the sidecar on embedded defaults, the demo agent through it, a clean stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import yaml

from sidecar.config import default_config_text

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_config(directory: str, metrics: str) -> tuple[str, str]:
    """The embedded defaults, listening on a socket in `directory` and serving metrics on
    `metrics`; returns (file, address)."""
    data = yaml.safe_load(default_config_text())
    address = f"unix:{directory}/tether.sock"
    data["listen"] = {"grpc": address, "metrics": metrics, "http": f"127.0.0.1:{_free_port()}"}
    data["journal"] = {"path": os.path.join(directory, "journal.db")}
    path = os.path.join(directory, "tether.yaml")
    Path(path).write_text(yaml.safe_dump(data), encoding="utf-8")
    return path, address


def _wait_ready(address: str, sidecar: subprocess.Popen[bytes]) -> bool:
    import tether

    with tether.Client(address) as client:
        try:
            client.wait_ready(READY_TIMEOUT_S)
        except tether.TetherError as error:
            print(f"demo: the sidecar did not become ready: {error.message}", file=sys.stderr)
            return False
    return sidecar.poll() is None


def _stop(sidecar: subprocess.Popen[bytes]) -> int:
    sidecar.send_signal(signal.SIGTERM)
    try:
        return sidecar.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        sidecar.kill()
        print("demo: the sidecar did not stop within its grace period", file=sys.stderr)
        return sidecar.wait()


def _crash_and_resume(agent: str, env: dict[str, str], address: str) -> int:
    """The second act: an agent killed mid-run resumes from the sidecar's journal."""
    import tether

    print("\n== crash and resume: the agent is killed (SIGKILL) at step 6 of 10, then re-run ==")
    command = [sys.executable, agent, "--run-id", "resume-demo", "--steps", "10"]
    crashed = subprocess.run([*command, "--crash-at", "6"], env=env).returncode
    print(f"demo: the agent died (exit code {crashed}); running it again with the same run id")
    resumed = subprocess.run(command, env=env).returncode
    with tether.Client(address) as client:
        ledger = client.status().upstreams["ledger"].hits
        entries = client.journal("resume-demo")
    replays = sum(e.replays for e in entries)
    print(
        f"demo: the ledger tool ran {ledger} times for 10 steps (once each); "
        f"{replays} calls were answered from the journal"
    )
    return resumed


def _instrumented_act(agent: str, env: dict[str, str], directory: str) -> int:
    """The fourth act: an agent instrumented with @tether.agent / @tether.tool, killed and
    resumed: its tool bodies do not run again for the steps already done."""
    print("\n== an instrumented agent (@tether.agent, @tether.tool): killed at step 4 of 6, "
          "then re-run ==")  # fmt: skip
    command = [sys.executable, agent, "--run-id", "instrumented-demo", "--steps", "6",
               "--ledger", os.path.join(directory, "ledger.jsonl")]  # fmt: skip
    crashed = subprocess.run([*command, "--crash-at", "4"], env=env).returncode
    print(f"demo: the agent died (exit code {crashed}); running it again with the same run id")
    return subprocess.run(command, env=env).returncode


SHOWN_METRICS = ("tether_calls_total", "tether_breaker_transitions_total",
                 "tether_journal_replays_total", "tether_overhead_seconds_count",
                 "tether_stream_recoveries_total")  # fmt: skip


def _show_metrics(metrics: str) -> None:
    """A few lines of the sidecar's metrics, scraped before it stops."""
    try:
        with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=5) as response:
            lines = response.read().decode().splitlines()
    except OSError as error:
        print(f"demo: could not read the metrics: {error}")
        return
    print(f"\n== a few of the metrics at http://{metrics}/metrics ==")
    for line in lines:
        if line.startswith(SHOWN_METRICS) and not line.endswith(" 0.0"):
            print(f"  {line}")


def _openai_client_act(agent: str, config_path: str) -> int:
    """The third act: an agent on the official openai client, pointed at the HTTP front."""
    front = yaml.safe_load(Path(config_path).read_text())["listen"]["http"]
    try:
        import openai  # noqa: F401 - the dev extra installs it
    except ImportError:
        print("\ndemo: the `openai` package is not installed; skipping the unchanged-client act")
        return 0
    print(f"\n== an unchanged OpenAI-client agent: OPENAI_BASE_URL=http://{front}/v1 ==")
    env = {**os.environ, "OPENAI_BASE_URL": f"http://{front}/v1", "OPENAI_API_KEY": "unused"}
    return subprocess.run([sys.executable, agent], env=env).returncode


def _recovery_act(config_path: str) -> int:
    """The fifth act: a stream cut half-way through its answer, recovered by the sidecar."""
    try:
        from openai import OpenAI
        from openai.types.chat import ChatCompletionUserMessageParam
    except ImportError:
        print("\ndemo: the `openai` package is not installed; skipping the stream-cut act")
        return 0
    front = yaml.safe_load(Path(config_path).read_text())["listen"]["http"]
    print("\n== a stream cut mid-answer: llm-cut drops the connection half-way through ==")
    client = OpenAI(base_url=f"http://{front}/v1", api_key="unused", max_retries=0)
    question = ChatCompletionUserMessageParam(
        role="user", content="what happens when a stream is cut?"
    )

    def streamed(model: str) -> tuple[str, int]:
        stream = client.chat.completions.create(model=model, messages=[question], stream=True)
        chunks = list(stream)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), len(chunks)

    text, count = streamed("llm-cut")
    uncut, _ = streamed("llm-backup")
    print(f"demo: the client read {count} chunks: {text!r}")
    print(f"demo: the same as an uncut answer, word for word, once: {text == uncut}")
    return 0 if text == uncut else 1


def run_demo(*, agent: str, steps: int) -> int:
    """Run `agent` against a fresh sidecar; the exit code is the agent's, else the sidecar's."""
    if not Path(agent).is_file():
        print(
            f"demo: agent script {agent!r} not found (run from the repository root)",
            file=sys.stderr,
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="tether-demo-") as directory:
        metrics = f"127.0.0.1:{_free_port()}"
        config_path, address = _write_config(directory, metrics)
        command = [sys.executable, "-m", "sidecar", "serve", "--config", config_path]
        sidecar = subprocess.Popen([*command, "--log-level", "WARNING"])
        print(f"demo: sidecar pid {sidecar.pid} starting on {address} (embedded mock upstreams)")
        print(f"demo: metrics at http://{metrics}/metrics while the demo runs "
              f"(`tether top --address {address} --metrics http://{metrics}/metrics`)")  # fmt: skip
        if not _wait_ready(address, sidecar):
            _stop(sidecar)
            return 1
        env = {**os.environ, "TETHER_ADDRESS": address}
        agent_code = subprocess.run(
            [sys.executable, agent, "--steps", str(steps)], env=env
        ).returncode
        resumable = Path(agent).with_name("resumable_agent.py")
        if agent_code == 0 and resumable.is_file():
            agent_code = _crash_and_resume(str(resumable), env, address)
        unchanged = Path(agent).with_name("openai_agent.py")
        if agent_code == 0 and unchanged.is_file():
            agent_code = _openai_client_act(str(unchanged), config_path)
        instrumented = Path(agent).with_name("instrumented_agent.py")
        if agent_code == 0 and instrumented.is_file():
            agent_code = _instrumented_act(str(instrumented), env, directory)
        if agent_code == 0:
            agent_code = _recovery_act(config_path)
        _show_metrics(metrics)
        sidecar_code = _stop(sidecar)
        print(f"demo: sidecar drained and stopped (exit code {sidecar_code})")
        print("demo: to watch it in Grafana, with traces in Tempo: `docker compose up`, then "
              "open http://127.0.0.1:3000 (dashboard \"Tether overview\")")  # fmt: skip
        return agent_code or sidecar_code
