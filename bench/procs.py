"""Child processes of the harness: start them pinned to a core, read their CPU time and memory.

Every figure about a process comes from `/proc/<pid>`: CPU time from `stat` (utime + stime,
the process and its children that are still alive), memory from `status` (VmRSS now, VmHWM
the peak). The proxy under test runs on `PROXY_CPU`; the harness, its load generator, the
mock upstream and the OTLP receiver share `LOAD_CPU`.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PROXY_CPU = 0
LOAD_CPU = 1
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def can_pin() -> bool:
    """Two cores or more, and a way to pin (`taskset`, or sched_setaffinity for ourselves)."""
    return (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity")


def pin_self(cpu: int) -> None:
    if can_pin():
        os.sched_setaffinity(0, {cpu})


def pinned(cpu: int, command: Sequence[str]) -> list[str]:
    """`command` run on `cpu` (taskset execs it: the pid stays the command's own)."""
    if can_pin() and shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *command]
    return list(command)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Child:
    """A started child process and where its output goes."""

    name: str
    proc: subprocess.Popen[bytes]
    started_at: float  # time.perf_counter() just before it was spawned
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM (a sidecar drains and exits)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit within `timeout_s`."""
        self.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def tail(self, lines: int = 20) -> str:
        """The last lines of its log, for error messages."""
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def spawn(
    name: str,
    command: Sequence[str],
    *,
    cpu: int,
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdout_pipe: bool = False,
) -> Child:
    """Start `command` pinned to `cpu`, its output in `log` (or a pipe for stdout)."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    started = time.perf_counter()
    proc = subprocess.Popen(
        pinned(cpu, command),
        stdout=subprocess.PIPE if stdout_pipe else out,
        stderr=out,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )
    return Child(name, proc, started, log)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the harness dies (Linux), so a killed run
    leaves no sidecar, mock or proxy behind."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _children(pid: int) -> list[int]:
    found = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(p) for p in handle.read().split()]
    return found


def tree(pid: int) -> list[int]:
    """`pid` and its living descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += _children(current)
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and its living descendants."""
    total = 0
    for each in tree(pid):
        try:
            with open(f"/proc/{each}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLOCK_TICKS


def _status_kb(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_mb(pid: int) -> float:
    """Resident memory now (VmRSS) of `pid` and its descendants, MiB."""
    return sum(_status_kb(each, "VmRSS") for each in tree(pid)) / 1024


def peak_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of `pid` and its descendants, MiB."""
    return sum(_status_kb(each, "VmHWM") for each in tree(pid)) / 1024


def wait_line(child: Child) -> str:
    """The first line the child prints on stdout (its port, by convention)."""
    assert child.proc.stdout is not None
    line = child.proc.stdout.readline().decode().strip()
    if not line:
        raise RuntimeError(f"{child.name} did not start: {child.tail()}")
    return line
