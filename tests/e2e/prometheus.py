"""A real Prometheus server (the Debian package's binary) for tests, on a free port."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

# found on PATH, as .ci/run finds (or installs) it
BINARY = shutil.which("prometheus")
JOB = "tether"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Prometheus:
    """`prometheus` scraping `targets` (host:port) every `interval`, exemplar storage on."""

    def __init__(self, directory: Path, targets: list[str], interval: str = "1s") -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "prometheus.log"
        scrape = {"job_name": JOB, "static_configs": [{"targets": targets}]}
        config = {"global": {"scrape_interval": interval}, "scrape_configs": [scrape]}
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30) -> Prometheus:
        command = [
            str(BINARY or "prometheus"),
            f"--config.file={self.directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--enable-feature=exemplar-storage",
        ]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start:\n{self.log_tail()}")
            time.sleep(0.1)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/`path`; the `data` of a success, RuntimeError with Prometheus's error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                body = json.load(answer)
        except urllib.error.HTTPError as error:
            body = json.load(error)
        if body.get("status") != "success":
            raise RuntimeError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The series an instant query returns now."""
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def exemplars(self, expr: str, since_s: float = 600) -> list[dict[str, Any]]:
        """Exemplars of the series `expr` selects, over the last `since_s` seconds."""
        now = time.time()
        found: list[dict[str, Any]] = self.api(
            "query_exemplars", query=expr, start=str(now - since_s), end=str(now)
        )
        return [exemplar for series in found for exemplar in series["exemplars"]]

    def wait_scraped(self, timeout_s: float = 15) -> bool:
        """Whether every target answered a scrape (`up == 1`) within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            up = self.query(f'up{{job="{JOB}"}}')
            if up and all(series["value"][1] == "1" for series in up):
                return True
            time.sleep(0.25)
        return False

    def scrape_errors(self) -> list[str]:
        """Each target's last scrape error (why `up` is 0), as Prometheus reports it."""
        targets = self.api("targets")["activeTargets"]
        return [f"{t['scrapeUrl']}: {t['lastError']}" for t in targets if t["lastError"]]

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
