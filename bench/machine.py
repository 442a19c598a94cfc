"""What the figures were measured on: the machine, its load, its disk's fsync, the versions."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

PACKAGES = ("grpcio", "aiohttp", "uvloop", "protobuf", "opentelemetry-sdk", "orjson")


def fsync_ms(directory: Path, samples: int = 200) -> dict[str, float]:
    """The cost of fsync after a 512-byte append on `directory`'s disk (median, p90), ms."""
    path = directory / "fsync-probe"
    costs = []
    with open(path, "wb") as handle:
        for _ in range(samples):
            handle.write(b"x" * 512)
            handle.flush()
            start = time.perf_counter()
            os.fsync(handle.fileno())
            costs.append((time.perf_counter() - start) * 1000)
    path.unlink()
    costs.sort()
    return {"p50": statistics.median(costs), "p90": costs[int(len(costs) * 0.9)]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def compile_project(root: Path) -> bool:
    """Byte-compile the code under test (the sidecar, the SDK, the floor), as installing a
    wheel does: the editable install leaves it as source, and where PYTHONDONTWRITEBYTECODE
    is set (as on this machine) every start would compile it again (~70 ms of a sidecar's
    start-up, which LiteLLM's compiled venv does not pay). Whether every file compiled."""
    import compileall

    packages = (root / "sidecar", root / "sdk" / "python" / "tether", root / "bench")
    return all([compileall.compile_dir(package, quiet=2) for package in packages])


def load_average() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def describe() -> dict[str, Any]:
    """The machine: CPU model and count, memory, kernel, and the load average now."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(_memory_gib(), 1),
        "kernel": platform.release(),
        "load_average_start": load_average(),
    }


def versions() -> dict[str, str]:
    """Python, Tether and the libraries on the hot path."""
    found = {"python": platform.python_version()}
    for name in ("tether", *PACKAGES):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def code_under_test() -> dict[str, Any]:
    """Where the measured `sidecar` package comes from, its commit, and whether the sidecar
    or SDK had uncommitted changes there (a shared work tree measures others' edits too)."""
    import sidecar

    root = Path(sidecar.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return run.stdout.strip() if run.returncode == 0 else ""

    dirty = bool(git("status", "--porcelain", "--", "sidecar", "sdk"))
    return {"path": str(root), "commit": git("rev-parse", "--short", "HEAD"), "dirty": dirty}
