"""The metrics port (`listen.metrics`): /metrics, /healthz, /readyz on aiohttp.

`/metrics` answers OpenMetrics (with exemplars) to a scraper that asks for it, as
Prometheus does, and the classic text format otherwise. `/healthz` says the process is up;
`/readyz` is 503 while the sidecar is not serving (starting or draining).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import exposition
from prometheus_client.openmetrics import exposition as openmetrics

from sidecar.config import split_host_port
from sidecar.telemetry.metrics import Metrics

OPENMETRICS = "application/openmetrics-text"


def make_app(metrics: Metrics, serving: Callable[[], bool]) -> web.Application:
    async def scrape(request: web.Request) -> web.Response:
        if OPENMETRICS in request.headers.get("Accept", ""):
            body = openmetrics.generate_latest(metrics.registry)  # type: ignore[no-untyped-call]
            content_type = openmetrics.CONTENT_TYPE_LATEST
        else:
            body = exposition.generate_latest(metrics.registry)
            content_type = exposition.CONTENT_TYPE_LATEST
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ready = serving()
        return web.Response(
            text="ready\n" if ready else "not ready\n", status=200 if ready else 503
        )

    app = web.Application()
    app.router.add_get("/metrics", scrape)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


class MetricsEndpoint:
    """The metrics HTTP server on `address` (host:port; port 0 picks a free one)."""

    def __init__(self, address: str, metrics: Metrics, serving: Callable[[], bool]) -> None:
        self.host, self.port = split_host_port(address)
        self._app = make_app(metrics, serving)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host.strip("[]"), self.port, reuse_port=False)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
