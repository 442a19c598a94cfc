"""The LiteLLM proxy, for comparison: installed into its own throwaway venv, one worker.

The venv lives outside the repository (default `~/.cache/tether-bench/litellm-venv`, or
$TETHER_BENCH_LITELLM_VENV) and is created on first use with pip; `--litellm-spec` (or
$TETHER_BENCH_LITELLM_SPEC) picks the version. The proxy gets the same mock upstream as the
sidecar, a master key (it refuses to start without one), and the settings its docs give for
production: no telemetry, errors-only logging, the bundled model cost map (no network).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from bench.load import MODEL, http_session
from bench.procs import PROXY_CPU, free_port, spawn
from bench.systems import Proxy, first_http_call

# The newest release whose `proxy` extra resolves on the package index this project uses
# (the 1.110 line needs a `litellm-proxy` package that is not published there).
DEFAULT_SPEC = os.environ.get("TETHER_BENCH_LITELLM_SPEC", "litellm[proxy]==1.108.5")
DEFAULT_VENV = Path(
    os.environ.get("TETHER_BENCH_LITELLM_VENV")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "tether-bench"
    / "litellm-venv"
)
MASTER_KEY = "sk-tether-bench-0123456789abcdef0123456789abcdef"
MARKER = ".tether-bench-spec"
SETUP = (
    "LiteLLM: `litellm --config ... --num_workers 1` (uvicorn, one worker), the same mock "
    "upstream as an `openai/` model, a master key, no database, LITELLM_LOG=ERROR, telemetry "
    "off, the bundled model cost map."
)


def ensure_venv(venv: Path, spec: str) -> Path:
    """The `litellm` command of a venv holding `spec`, created (or refreshed) when needed."""
    command = venv / "bin" / "litellm"
    marker = venv / MARKER
    if command.exists() and marker.exists() and marker.read_text() == spec:
        return command
    print(f"installing {spec} into {venv} (once; a minute or two)...", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    if not (venv / "bin" / "python").exists():
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]
    subprocess.run([*pip, spec], check=True)
    marker.write_text(spec)
    return command


def version(venv: Path) -> str:
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or "unknown"


def write_config(directory: Path, upstream_url: str) -> Path:
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"{upstream_url}/v1",
                    "api_key": "bench-upstream-key",
                },
            }
        ],
        "litellm_settings": {"telemetry": False},
        "general_settings": {"master_key": MASTER_KEY},
    }
    path = directory / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_litellm(command: Path, upstream_url: str, directory: Path) -> Proxy:
    """Spawn the proxy (one worker) on the proxy core; wait for its first answered call."""
    port = free_port()
    config = write_config(directory, upstream_url)
    argv = [
        str(command),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        env[name] = ""
    child = spawn(
        "litellm", argv, cpu=PROXY_CPU, env=env, cwd=directory, log=directory / "litellm.log"
    )
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    proxy = Proxy("litellm", child, f"http://127.0.0.1:{port}/v1", headers=headers)
    try:
        async with http_session() as session:
            proxy.startup_s = await first_http_call(child, session, proxy.http_url, headers)
    except BaseException:
        child.stop()
        raise
    proxy.http_startup_s = proxy.startup_s
    return proxy
