"""The OpenAI-compatible HTTP front (`listen.http`): attach an agent without changing its code.

`POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`),
`POST /v1/embeddings` and `GET /v1/models`. The request's `model` picks a route (`routes:` in
the config, else every model upstream under its own name), and the call then runs through
`SidecarService.proxy` / `proxy_stream`, exactly as a gRPC `Call` / `StreamCall` does:
journal, policies, fallbacks and telemetry are the same code. Errors leave in OpenAI's shape
through the one table in `sidecar.http.errors`; auth and drain refusals live in a middleware.

Headers in: `X-Tether-Run-Id`, `Idempotency-Key` (journaled when both are set),
`traceparent` / `tracestate` (the caller's trace continues). Headers out: `X-Tether-Upstream`,
`X-Tether-Attempts`, `X-Tether-Replayed` and, on unary answers, `X-Tether-Overhead-Ms`.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import orjson
from aiohttp import web

from sidecar import errors
from sidecar.config import split_host_port
from sidecar.http.errors import UnknownModelError, describe
from sidecar.pipeline import Plan, StreamInfo
from sidecar.service import SidecarService
from tether.v1 import sidecar_pb2 as pb

log = logging.getLogger("tether.sidecar")

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
SHUTDOWN_TIMEOUT_S = 0.5  # in-flight calls have had their grace before the front stops
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: BaseException) -> web.Response:
    http_status, body, headers = describe(exc)
    return web.json_response(body, status=http_status, headers=headers, dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _http_error(exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (413, 404, 405) in OpenAI's shape."""
    codes = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}
    error = {"message": exc.text or exc.reason, "type": "invalid_request_error", "param": None,
             "code": codes.get(exc.status, "invalid_request")}  # fmt: skip
    return web.json_response({"error": error}, status=exc.status, dumps=_dumps)


def _flag(value: bool) -> str:
    return "true" if value else "false"


class HttpFront:
    """The aiohttp app of the front and its listener on `address` (port 0: a free one)."""

    def __init__(self, address: str, service: SidecarService, token: str | None) -> None:
        self.host, self.port = split_host_port(address)
        self.service = service
        # model name -> its plan: the upstream, its fallbacks, its context fallback
        self.plans = service.pipeline.model_plans(service.config)
        self._expected = f"Bearer {token}".encode() if token else None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(
            client_max_size=service.config.limits.max_payload_bytes, middlewares=[self._guard]
        )
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_get("/v1/models", self.models)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_S)  # fmt: skip
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host.strip("[]"), self.port, reuse_port=False)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- cross-cutting: auth, drain, errors ------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            self._admit(request)
            return await handler(request)
        except web.HTTPException as exc:
            return _http_error(exc)
        except Exception as exc:
            if isinstance(exc, errors.SidecarError):
                log.info("http call failed: %s: %s", type(exc).__name__, exc.message)
            else:
                log.exception("internal error while serving an http call")
            return error_response(exc)

    def _admit(self, request: web.Request) -> None:
        if self._expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, self._expected):
                raise errors.UnauthenticatedError("missing or wrong bearer token")
        if not self.service.serving:
            raise errors.DrainingError("the sidecar is shutting down")

    # -- handlers --------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "tether"}
                for model in self.plans]  # fmt: skip
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "chat")

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._proxy(request, "embeddings")

    def _call(
        self, payload: bytes, body: Any, operation: str, request: web.Request
    ) -> tuple[pb.CallRequest, Plan]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise errors.InvalidRequestError("model is required", field="model")
        plan = self.plans.get(model)
        if plan is None:
            raise UnknownModelError(model, list(self.plans))
        call = pb.CallRequest(
            upstream=plan.candidates[0].name, kind=pb.CALL_KIND_MODEL, operation=operation,
            payload=payload, run_id=request.headers.get("X-Tether-Run-Id", ""),
            idempotency_key=request.headers.get("Idempotency-Key", ""),
        )  # fmt: skip
        return call, plan

    async def _proxy(self, request: web.Request, operation: str) -> web.StreamResponse:
        payload = await request.read()  # over client_max_size: 413
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise errors.InvalidRequestError(f"body is not JSON: {exc}", field="body") from None
        if not isinstance(body, dict):
            raise errors.InvalidRequestError("body must be a JSON object", field="body")
        call, plan = self._call(payload, body, operation, request)
        rpc = f"http.{operation}"
        trace = {name: request.headers[name] for name in TRACE_HEADERS if name in request.headers}
        if operation == "chat" and body.get("stream") is True:
            return await self._stream(request, call, plan, rpc, trace)
        proxied = await self.service.proxy(call, rpc, trace, None, plan)
        answer = proxied.response
        headers = {
            "X-Tether-Upstream": answer.upstream,
            "X-Tether-Attempts": str(answer.attempts),
            "X-Tether-Replayed": _flag(answer.replayed),
            "X-Tether-Overhead-Ms": f"{proxied.overhead_s * 1000:.3f}",
        }
        return web.Response(body=answer.payload, headers=headers, content_type="application/json")

    async def _stream(
        self,
        request: web.Request,
        call: pb.CallRequest,
        plan: Plan,
        rpc: str,
        trace: dict[str, str],
    ) -> web.StreamResponse:
        """Server-sent events; an error before the first chunk is a plain HTTP error, after
        it an in-band `data: {"error": ...}` event, and the stream ends without `[DONE]`."""
        info = StreamInfo()
        chunks = self.service.proxy_stream(call, rpc, trace, None, info, plan)
        async with aclosing(chunks):
            first = await anext(chunks)
            headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                       "X-Tether-Replayed": _flag(first.replayed),
                       "X-Tether-Attempts": str(info.attempts)}  # fmt: skip
            if info.upstream or first.upstream:
                headers["X-Tether-Upstream"] = info.upstream or first.upstream
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            await self._write_events(response, first, chunks)
        await response.write_eof()
        return response

    async def _write_events(
        self,
        response: web.StreamResponse,
        first: pb.StreamChunk,
        rest: AsyncIterator[pb.StreamChunk],
    ) -> None:
        chunk = first
        while not chunk.final:
            await response.write(b"data: " + chunk.data + b"\n\n")
            try:
                chunk = await anext(rest)
            except Exception as exc:
                log.info("http stream failed after its first chunk: %s", exc)
                _, body, _ = describe(exc)
                await response.write(b"data: " + orjson.dumps(body) + b"\n\n")
                return
        await response.write(b"data: [DONE]\n\n")
