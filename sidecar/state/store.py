"""The Redis client of shared rate limits and breakers: scripts, bounds, and breaker events.

Every operation is one script call (EVALSHA on one pipelining connection, `state.resp`; on
NOSCRIPT, after a Redis restart, the script is loaded and called once more), bounded by
`state.timeout_s`, never retried: a failure or timeout goes to `StoreHealth`, which starts
an incident and takes the store out of every call's path until a probe finds it back.
Breaker transitions are published by the scripts and followed here on one subscription per
sidecar (redis-py's pub/sub), so every replica's view of a breaker changes within a round
trip of the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from sidecar.config import Config, StateConfig, resolve_secret
from sidecar.state.health import StoreHealth
from sidecar.state.resp import ScriptClient
from sidecar.state.scripts import SCRIPTS

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("tether.sidecar.state")

# How long the subscription waits for a message before looking again (cancellation points).
LISTEN_POLL_S = 1.0
STORE = "redis"


class StoreError(Exception):
    """A store operation failed or timed out, or the store is down (no call was made)."""


class BreakerState(Protocol):
    """A shared breaker as the store sees it: told of its state, and of store incidents."""

    upstream: str

    def apply(self, reply: list[Any]) -> None: ...

    def read_args(self) -> list[Any]: ...


class StateStore:
    """A Redis server shared by every sidecar with the same `key_prefix`."""

    def __init__(self, config: StateConfig, url: str) -> None:
        self.config = config
        self.prefix = config.key_prefix
        self.replicas = config.replicas
        self.timeout_s = config.timeout_s
        self.channel = f"{self.prefix}:breakers"
        self.scripts = ScriptClient(url, SCRIPTS)  # the calls' path: one pipelined socket
        # Breaker events on redis-py's pub/sub, a connection of its own.
        self._events = _client(url, config.timeout_s)
        self.health = StoreHealth(STORE, public_address(url), config.retry_after_s, self._reconnect)
        self.health.on_up.append(self._resubscribe)
        self.breakers: dict[str, BreakerState] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    def key(self, upstream: str, what: str) -> str:
        """The key of one upstream's state; `{upstream}` is the Redis Cluster hash tag."""
        return f"{self.prefix}:{{{upstream}}}:{what}"

    @property
    def up(self) -> bool:
        return self.health.up

    async def run(
        self, script: str, keys: list[str], args: list[Any], *, upstream: str, policy: str
    ) -> list[Any]:
        """One script call within `timeout_s`; StoreError when the store is down or fails."""
        if not self.health.up:
            raise StoreError(f"shared state store {self.health.where} is down")
        try:
            async with asyncio.timeout(self.timeout_s):
                reply: list[Any] = await self.scripts.call(script, keys, args)
        except Exception as exc:  # redis errors, OSError, TimeoutError: the store failed
            self.health.failed(exc, upstream, policy)
            raise StoreError(str(exc)) from exc
        return reply

    def spawn(self, work: Coroutine[Any, Any, Any], *, timer: bool = False) -> asyncio.Task[Any]:
        """Run `work` in the background (settlements, outcomes; `timer`: a wait for a later
        step): the caller does not wait. Cancelled when the store closes."""
        task = asyncio.get_running_loop().create_task(work)
        (self._timers if timer else self._tasks).add(task)
        task.add_done_callback(self._done)
        return task

    @property
    def pending(self) -> int:
        """Background operations not finished yet (timers excluded)."""
        return len(self._tasks)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._timers.discard(task)
        if not task.cancelled() and isinstance(task.exception(), Exception):
            exc = task.exception()
            if not isinstance(exc, StoreError):
                log.error("shared state: background update failed: %r", exc)

    # -- breakers: registration, events, resync ---------------------------------------------

    def register(self, breaker: BreakerState) -> None:
        self.breakers[breaker.upstream] = breaker

    async def start(self) -> None:
        """Check the store once (a failure starts an incident; the sidecar serves anyway)
        and follow breaker transitions."""
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._ping()
        except Exception as exc:
            self.health.failed(exc, "", "startup")
        if self.breakers:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        """Stop following events, cancel what runs in the background, close the sockets;
        each step bounded (a frozen server must not hold up a drain)."""
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.wait({self._listener}, timeout=2 * self.timeout_s)
        await self.health.close()
        tasks = [*self._tasks, *self._timers]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2 * self.timeout_s)
        self.scripts.reset()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.timeout_s):
                await self._events.aclose()

    async def _ping(self) -> None:
        async with asyncio.timeout(self.timeout_s):
            await self.scripts.ping()

    async def _reconnect(self) -> None:
        """The probe of an incident: a new connection (the old one may be dead, or hold
        the answers of calls long given up), then PING on it."""
        self.scripts.reset()
        await self._ping()

    def _resubscribe(self) -> None:
        """The store is back: the listener subscribes again and reads every breaker (events
        published while it was away are lost)."""
        self._subscribed.set()

    async def _listen(self) -> None:
        while True:
            if not self.health.up:
                self._subscribed.clear()
                await self._subscribed.wait()
            with contextlib.suppress(Exception):  # none left from before the incident
                async with asyncio.timeout(self.timeout_s):
                    await self._events.connection_pool.disconnect()
            pubsub = self._events.pubsub()
            try:
                async with asyncio.timeout(self.timeout_s):
                    await pubsub.subscribe(self.channel)
                await self.resync()
                while self.health.up:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=LISTEN_POLL_S
                    )
                    if message is not None and message.get("type") == "message":
                        self._dispatch(message["data"])
            except Exception as exc:
                self.health.failed(exc, "", "breaker")
            finally:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self.timeout_s):
                        await pubsub.aclose()

    def _dispatch(self, data: bytes) -> None:
        parts = data.decode().split(" ")
        if len(parts) != 6:
            return
        breaker = self.breakers.get(parts[0])
        if breaker is not None:
            _, state, epoch, failures, left, gen = parts
            breaker.apply([state, int(epoch), int(failures), int(left), gen, 0])

    async def resync(self) -> None:
        """Read every breaker's state into its replica's view."""

        async def read(breaker: BreakerState) -> None:
            keys = [self.key(breaker.upstream, "breaker"), self.key(breaker.upstream, "probes")]
            reply = await self.run("breaker_read", keys, breaker.read_args(),
                                   upstream=breaker.upstream, policy="breaker")  # fmt: skip
            breaker.apply(reply)

        await asyncio.gather(*(read(b) for b in self.breakers.values()))


def _client(url: str, timeout_s: float) -> Redis:
    """redis-py's client (imported here: a sidecar without shared state never loads it)."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),  # no hidden retries and backoffs: an incident instead
    )


def public_address(url: str) -> str:
    """The URL without its credentials, fit for logs and errors."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def build_state(config: Config) -> StateStore | None:
    """The shared store of `state.backend: redis` (not connected until used), else None."""
    state = config.state
    if state.backend != "redis":
        return None
    url = state.url or resolve_secret(state.url_env, what="state.url_env")
    if url is None:  # pragma: no cover - the config validates one of them
        raise ValueError("state.backend redis needs state.url or state.url_env")
    return StateStore(state, url)
