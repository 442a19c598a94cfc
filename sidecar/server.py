"""Build and run the grpc.aio server: the Sidecar service, health, reflection, drain.

`create_server(config)` binds and returns `(server, port)` without starting, so tests run it
on port 0 or a temporary unix socket; `serve(config)` runs it until SIGTERM or SIGINT, then
drains: health turns NOT_SERVING, new calls get UNAVAILABLE (reason DRAINING; 503 on the HTTP
front of `listen.http`), in-flight calls
get `shutdown.grace_s` to finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from sidecar.config import Config, resolve_secret, split_host_port
from sidecar.http.front import HttpFront
from sidecar.interceptors import GuardInterceptor
from sidecar.journal import build_store
from sidecar.journal.base import count_store_events
from sidecar.journal.recorder import Recorder
from sidecar.service import SidecarService
from sidecar.state.health import StoreMetrics
from sidecar.telemetry.endpoint import MetricsEndpoint
from sidecar.telemetry.hub import Telemetry
from sidecar.upstreams.base import Upstream
from sidecar.upstreams.registry import build_upstreams
from tether.v1 import sidecar_pb2, sidecar_pb2_grpc

log = logging.getLogger("tether.sidecar")

SERVICE_NAME = sidecar_pb2.DESCRIPTOR.services_by_name["Sidecar"].full_name
TELEMETRY_FLUSH_S = 3.0  # spans still queued at exit get this long to leave
MESSAGE_SLACK_BYTES = 1024 * 1024  # envelope room above the payload limits


class AddressInUseError(OSError):
    """Another live process already listens on the configured address."""


def unix_path(address: str) -> str | None:
    """The filesystem path of a `unix:` address, else None."""
    if not address.startswith("unix:"):
        return None
    rest = address.removeprefix("unix:")
    return "/" + rest.lstrip("/") if rest.startswith("//") else rest


def _claim_unix_path(path: str) -> None:
    """Remove a stale socket file; refuse one a live process listens on, or a non-socket."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise AddressInUseError(f"cannot listen on unix:{path}: the file there is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: left over by a crash
        return
    finally:
        probe.close()
    raise AddressInUseError(f"another process listens on unix:{path}")


@dataclass
class SidecarServer:
    """A bound (not yet started) sidecar and what it needs to start and drain."""

    server: grpc.aio.Server
    service: SidecarService
    guard: GuardInterceptor
    health: HealthServicer
    upstreams: dict[str, Upstream]
    grace_s: float
    addresses: list[str] = field(default_factory=list)
    metrics_endpoint: MetricsEndpoint | None = None
    http_front: HttpFront | None = None
    _socket_paths: list[str] = field(default_factory=list)
    _retention: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the journal and upstream clients, start serving, mark health SERVING."""
        recorder = self.service.recorder
        if recorder is not None:
            await recorder.store.open()
            await self._count_in_doubt(recorder)
            self._retention = asyncio.create_task(self._retain(recorder))
        for upstream in self.upstreams.values():
            await upstream.start()
        if self.service.pipeline.state is not None:
            await self.service.pipeline.state.start()  # a store that is down: an incident
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.start()
            log.info("metrics on %s/metrics", self.metrics_endpoint.url)
        if self.http_front is not None:
            await self.http_front.start()
            log.info("OpenAI-compatible front on %s/v1", self.http_front.url)
        await self.server.start()
        for path in self._socket_paths:
            os.chmod(path, 0o600)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s", ", ".join(self.addresses))

    @property
    def http_url(self) -> str | None:
        """The HTTP front's base URL (its bound port), or None when `listen.http` is unset."""
        return self.http_front.url if self.http_front is not None else None

    async def _retain(self, recorder: Recorder) -> None:
        """Apply the journal's retention rules every `interval_s`, in the background."""
        rules = self.service.config.journal.retention
        while True:
            await asyncio.sleep(rules.interval_s)
            if not recorder.store.available:
                continue  # the store's incident, logged once by the store
            try:
                removed = await recorder.store.expire(time.time())
            except Exception:
                log.exception("journal retention failed; will try again")
                continue
            if removed.entries or removed.checkpoints or removed.runs:
                log.info("journal retention removed %d entries, %d checkpoints, %d runs",
                         removed.entries, removed.checkpoints, removed.runs)  # fmt: skip
            await self._count_in_doubt(recorder)

    async def _count_in_doubt(self, recorder: Recorder) -> None:
        """Set tether_journal_in_doubt_entries: entries begun and never completed, except
        those of the calls executing in this process now."""
        count_started = getattr(recorder.store, "count_started", None)
        if count_started is None or not recorder.store.available:  # no query, or an incident
            return
        try:
            count = await count_started(list(recorder._running))
        except Exception as exc:
            log.warning("journal: could not count the entries in doubt: %s", exc)
            return
        self.service.telemetry.metrics.journal_in_doubt_entries.set(count)

    async def _set_health(self, state: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await self.health.set("", state)
        await self.health.set(SERVICE_NAME, state)

    async def drain(self, grace_s: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within the grace period, stop."""
        grace = self.grace_s if grace_s is None else grace_s
        self.guard.draining = True
        self.service.serving = False
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("draining: %d calls in flight, grace %.1f s", self.service.in_flight, grace)
        remaining = await self._wait_in_flight(grace)
        if self.http_front is not None:
            await self.http_front.stop()
        await self.server.stop(max(remaining, 0.1))
        await self.close_upstreams()
        await self.close_state()
        await self.close_journal()
        await self.close_telemetry()
        self.remove_socket_files()
        log.info("stopped")

    async def _wait_in_flight(self, grace_s: float) -> float:
        """Wait until no call is in flight or the grace is over; returns the grace left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        # Polled only while draining, so the hot path keeps no extra bookkeeping.
        while self.service.in_flight and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        if self.service.in_flight:
            log.warning("grace period over: cancelling %d calls", self.service.in_flight)
        return deadline - loop.time()

    def remove_socket_files(self) -> None:
        """Unlink the unix socket files this server bound."""
        for path in self._socket_paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def close_upstreams(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()

    async def close_telemetry(self) -> None:
        """Stop the metrics port; flush spans for at most TELEMETRY_FLUSH_S (never hang exit).

        The flush runs in a daemon thread, not the loop's executor: the loop and the
        interpreter join executor threads at exit, and an export stuck on a hanging collector
        would hold the exit for as long as the exporter's timeout and retries last.
        """
        if self.metrics_endpoint is not None:
            await self.metrics_endpoint.stop()
        telemetry = self.service.telemetry
        flushed = _in_daemon_thread(lambda: telemetry.shutdown(TELEMETRY_FLUSH_S - 0.5))
        done, _ = await asyncio.wait({flushed}, timeout=TELEMETRY_FLUSH_S)
        if not done:
            log.warning("telemetry: spans not flushed within %.0f s; exiting anyway",
                        TELEMETRY_FLUSH_S)  # fmt: skip

    async def close_state(self) -> None:
        """Close the shared state store's connections (state.backend: redis)."""
        if self.service.pipeline.state is not None:
            await self.service.pipeline.state.close()

    async def close_journal(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
            self._retention = None
        if self.service.recorder is not None:
            await self.service.recorder.store.close()


def _in_daemon_thread(work: Callable[[], None]) -> asyncio.Future[None]:
    """Run `work` in a daemon thread (nobody waits for it at exit); the future is done when
    it returns. Its errors are logged, not raised."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not future.done():
            future.set_result(None)

    def run() -> None:
        try:
            work()
        except Exception as exc:
            log.warning("telemetry: flushing spans failed: %s", exc)
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(done)

    threading.Thread(target=run, name="tether-telemetry-flush", daemon=True).start()
    return future


def _server_options(config: Config) -> list[tuple[str, int]]:
    limits = config.limits
    # Payloads up to twice the limit still reach the service, which refuses them with the
    # sizes in the details; only beyond that does gRPC's own bare size check answer.
    receive_limit = 2 * limits.max_payload_bytes + MESSAGE_SLACK_BYTES
    return [
        ("grpc.max_receive_message_length", receive_limit),
        ("grpc.max_send_message_length", limits.max_response_bytes + MESSAGE_SLACK_BYTES),
        # Two sidecars must not silently share one TCP port.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


def _bind(server: grpc.aio.Server, address: str) -> tuple[str, int, str | None]:
    """Bind one address; returns the bound address, its TCP port (0 for unix), socket path."""
    path = unix_path(address)
    if path is not None:
        _claim_unix_path(path)
        old_umask = os.umask(0o177)  # the socket file is created 0600, never wider
        try:
            _add_port(server, address)
        finally:
            os.umask(old_umask)
        return address, 0, path
    _probe_tcp(address)
    port = _add_port(server, address)
    host = address.rpartition(":")[0]
    return f"{host}:{port}", port, None


def _probe_tcp(address: str) -> None:
    """AddressInUseError with the OS's reason when no address of a fixed TCP port binds.

    gRPC reports a failed bind only as "Failed to bind" (and logs the reason on its own), so
    the usual case, a taken port, is found first with a plain socket set up like gRPC's.
    """
    host, port = split_host_port(address)
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return  # gRPC reports it
    reasons = []
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                reasons.append(exc.strerror or str(exc))
                continue
        return
    if reasons:
        raise AddressInUseError(f"cannot listen on {address}: {reasons[0]}")


def _add_port(server: grpc.aio.Server, address: str) -> int:
    """`add_insecure_port`, its bare RuntimeError turned into AddressInUseError."""
    try:
        return server.add_insecure_port(address)
    except RuntimeError as exc:
        # gRPC says only "Failed to bind"; with SO_REUSEPORT off it is mostly a taken port.
        raise AddressInUseError(
            f"cannot listen on {address}: address already in use or not available"
        ) from exc


def build_recorder(config: Config) -> Recorder | None:
    """The journal named by `journal.backend` (opened when the server starts), or None."""
    if not config.journal.enabled:
        return None
    return Recorder(build_store(config.journal), config.journal)


async def create_server(config: Config) -> tuple[SidecarServer, int]:
    """Build and bind the sidecar (not started) on the running loop; the port is the first
    TCP port bound, or 0 when it listens on unix sockets only."""
    token = resolve_secret(config.auth.token_env, what="auth.token_env") if config.auth else None
    upstreams = build_upstreams(config)
    guard = GuardInterceptor(token)
    server = grpc.aio.server(
        interceptors=[guard],
        options=_server_options(config),
        maximum_concurrent_rpcs=config.limits.max_concurrent_rpcs,
    )
    telemetry = Telemetry(config)
    recorder = build_recorder(config)
    if recorder is not None:
        recorder.store.observe_commit = telemetry.journal_commit
        recorder.store.observe_store = count_store_events(telemetry.metrics)
    service = SidecarService(config, upstreams, recorder=recorder, telemetry=telemetry)
    if service.pipeline.state is not None:
        service.pipeline.state.health.observe(StoreMetrics(telemetry.metrics))
    sidecar_pb2_grpc.add_SidecarServicer_to_server(service, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
    sidecar = SidecarServer(server, service, guard, health, upstreams, config.shutdown.grace_s)
    if config.listen.metrics:

        def ready() -> bool:  # serving, and the journal (if any) answers
            return service.serving and (recorder is None or recorder.store.available)

        sidecar.metrics_endpoint = MetricsEndpoint(config.listen.metrics, telemetry.metrics, ready)
    if config.listen.http:
        sidecar.http_front = HttpFront(config.listen.http, service, token)
    try:
        first_port = _bind_all(sidecar, config.listen.grpc)
    except AddressInUseError:
        sidecar.remove_socket_files()  # those bound so far: nobody will ever listen on them
        raise
    return sidecar, first_port


def _bind_all(sidecar: SidecarServer, addresses: list[str]) -> int:
    """Bind every address; returns the first TCP port bound (0 when only unix sockets)."""
    first_port = 0
    for address in addresses:
        bound, port, path = _bind(sidecar.server, address)
        sidecar.addresses.append(bound)
        if path is not None:
            sidecar._socket_paths.append(path)
        first_port = first_port or port
    return first_port


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain; returns the process exit code."""
    sidecar, _ = await create_server(config)
    await sidecar.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("signal received: draining")
    await sidecar.drain()
    return 0


def run(config: Config) -> int:
    """Run `serve` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(serve(config))
    return uvloop.run(serve(config))
