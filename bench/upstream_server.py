"""An instant OpenAI-compatible upstream for benchmarks: `python -m bench.upstream_server`.

Answers `/v1/chat/completions` (unary and SSE) and `/tool` at once, with a fixed body. Prints
its port on stdout when ready.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

CHAT = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}'
)
CHUNK = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","model":"bench",'
    b'"choices":[{"index":0,"delta":{"content":"ok"}}]}\n\n'
)
USAGE = (
    b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}\n\n'
)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    if b'"stream":true' not in body.replace(b" ", b""):
        return web.Response(body=CHAT, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(CHUNK + CHUNK + USAGE + b"data: [DONE]\n\n")
    return resp


async def tool(request: web.Request) -> web.Response:
    return web.Response(body=await request.read(), content_type="application/json")


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/tool", tool)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[union-attr]
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.port))
    except ImportError:
        asyncio.run(main(args.port))
