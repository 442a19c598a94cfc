"""The transport floor: the bare gRPC and HTTP proxies, without any Tether logic.

`python -m bench.floor --upstream URL [--grpc unix:PATH] [--http HOST:PORT]` serves
- `tether.v1.Sidecar/Call` on a grpc.aio server (the SDK's AsyncClient calls it as it calls
  the sidecar): the request's payload is POSTed to the upstream's `/v1/chat/completions`
  and the answer's bytes go back in `CallResponse.payload`;
- `POST /v1/chat/completions` on an aiohttp server: the body is POSTed to the same URL and
  the answer's bytes, status and content type go back;
both through ONE shared aiohttp client, on uvloop like the sidecar. No policies, journal,
telemetry, auth or JSON parsing: what a call costs through the bare transports on this
machine, the floor under the sidecar's own figures. It prints one `ready ...` line on
stdout once both listen, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import aiohttp
import grpc
from aiohttp import web

from tether.v1 import sidecar_pb2 as pb
from tether.v1 import sidecar_pb2_grpc as pb_grpc

JSON = {"Content-Type": "application/json"}
MAX_CONNECTIONS = 512  # the sidecar's upstream pool in the harness


class FloorServicer(pb_grpc.SidecarServicer):  # type: ignore[misc]
    """Only `Call`: forward the payload, answer with the upstream's bytes."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url

    async def Call(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async with self.session.post(self.url, data=request.payload, headers=JSON) as resp:
            body = await resp.read()
            status = resp.status
        if status != 200:  # counted as an error by the load generator, as the sidecar's are
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"upstream answered {status}")
        return pb.CallResponse(payload=body, upstream_status=status, attempts=1)


def http_app(session: aiohttp.ClientSession, url: str) -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        async with session.post(url, data=body, headers=JSON) as resp:
            answer = await resp.read()
            kind = resp.headers.get("Content-Type", "application/json")
            return web.Response(body=answer, status=resp.status, headers={"Content-Type": kind})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def serve(upstream: str, grpc_address: str | None, http_address: str | None) -> None:
    url = f"{upstream.rstrip('/')}/v1/chat/completions"
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS),
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server, runner, ready = None, None, []
    try:
        if grpc_address:
            server = grpc.aio.server()
            pb_grpc.add_SidecarServicer_to_server(FloorServicer(session, url), server)
            server.add_insecure_port(grpc_address)
            await server.start()
            ready.append(f"grpc={grpc_address}")
        if http_address:
            host, _, port = http_address.rpartition(":")
            runner = web.AppRunner(http_app(session, url), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, host.strip("[]"), int(port)).start()
            bound = runner.addresses[0]
            ready.append(f"http={bound[0]}:{bound[1]}")
        print("ready " + " ".join(ready), flush=True)
        await stop.wait()
    finally:
        if server is not None:
            await server.stop(0.5)
        if runner is not None:
            await runner.cleanup()
        await session.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--upstream", required=True, help="base URL of the upstream (no /v1)")
    parser.add_argument("--grpc", help="where the gRPC server listens, e.g. unix:/tmp/f.sock")
    parser.add_argument("--http", help="where the HTTP server listens, HOST:PORT (0: free)")
    args = parser.parse_args(argv)
    if not args.grpc and not args.http:
        parser.error("give --grpc, --http or both")
    coro = serve(args.upstream, args.grpc, args.http)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with the sidecar on POSIX
        asyncio.run(coro)
        return
    uvloop.run(coro)


if __name__ == "__main__":
    main()
