"""Redis for tests: the machine's server (skipped or failed when missing, see
`tests.conftest.require_service`), a key prefix of a test's own, and throwaway servers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import require_service

REDIS_URL = "redis://127.0.0.1:6379/0"
REDIS_SERVER = shutil.which("redis-server")


def _reachable(url: str) -> str | None:
    """None when a Redis server answers PING at `url`, else why not."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:
        return f"no Redis at {url}: {exc}"
    return None


def require_redis() -> str:
    """The machine's Redis URL; skip (or fail under TETHER_REQUIRE_SERVICES=1) without one."""
    why = _reachable(REDIS_URL)
    require_service("redis", why is None, why or "")
    return REDIS_URL


def delete_prefix(url: str, prefix: str) -> None:
    """Remove every key under `prefix:`."""
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def redis_url() -> str:
    return require_redis()


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix no other test uses; its keys are removed afterwards."""
    prefix = f"tt-{uuid.uuid4().hex[:10]}"
    yield prefix
    delete_prefix(redis_url, prefix)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class RedisProcess:
    """A redis-server of the test's own on a free port, which the test may stop and start
    again (on the same port, empty: it keeps nothing on disk)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", str(self.directory)]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while _reachable(self.url) is not None:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_process(short_tmp: Path) -> Iterator[RedisProcess]:
    """A started redis-server of the test's own (needs the `redis-server` binary)."""
    require_service("redis-server", REDIS_SERVER is not None, "no redis-server binary on PATH")
    server = RedisProcess(short_tmp)
    server.start()
    yield server
    server.stop()
