"""The HTTP front (`listen.http`): attach an agent without changing its code.

OpenAI's API: `POST /v1/chat/completions` (JSON, or server-sent events with `"stream": true`),
`POST /v1/embeddings` and `GET /v1/models`; Anthropic's: `POST /v1/messages`
(`sidecar.http.anthropic`). The request's `model` picks a route (`routes:` in the config, else
every model upstream under its own name), and the call then runs through
`SidecarService.proxy` / `proxy_stream`, exactly as a gRPC `Call` / `StreamCall` does:
journal, policies, fallbacks and telemetry are the same code. Errors leave in the shape of the
API the caller speaks through the one table in `sidecar.http.errors`; auth and drain refusals
live in a middleware. The token (`auth.token_env`) is accepted as `Authorization: Bearer` and
as `x-api-key` (what Anthropic's client sends).

Headers in: `X-Tether-Run-Id`, `Idempotency-Key` (journaled when both are set),
`traceparent` / `tracestate` (the caller's trace continues). Headers out: `X-Tether-Upstream`,
`X-Tether-Attempts`, `X-Tether-Replayed` and, on unary answers, `X-Tether-Overhead-Ms`.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Final, Protocol

import orjson
from aiohttp import web

from sidecar import errors
from sidecar.config import split_host_port
from sidecar.http import anthropic
from sidecar.http.errors import UnknownModelError, describe, describe_anthropic
from sidecar.policies.deadline import tighter
from sidecar.routes import Plan, StreamInfo
from sidecar.service import SidecarService
from tether.v1 import sidecar_pb2 as pb

log = logging.getLogger("tether.sidecar")

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
SHUTDOWN_TIMEOUT_S = 0.5  # in-flight calls have had their grace before the front stops
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(request: web.Request, exc: BaseException) -> web.Response:
    """The error in the shape of the API the request speaks."""
    shape = describe_anthropic if anthropic.speaks_anthropic(request) else describe
    http_status, body, headers = shape(exc)
    return web.json_response(body, status=http_status, headers=headers, dumps=_dumps)


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class Framing(Protocol):
    """How an API writes a streamed answer as server-sent events."""

    def event(self, data: bytes) -> bytes:
        """One chunk of the answer."""
        ...

    def end(self) -> bytes:
        """The clean end, written once the call has completed."""
        ...

    def error(self, exc: BaseException) -> bytes:
        """The in-band error that ends a stream cut after its first chunk."""
        ...


class OpenAIFraming:
    """`data: <chunk>`, then `data: [DONE]`; an error is `data: {"error": ...}`."""

    def event(self, data: bytes) -> bytes:
        return b"data: " + data + b"\n\n"

    def end(self) -> bytes:
        return b"data: [DONE]\n\n"

    def error(self, exc: BaseException) -> bytes:
        return b"data: " + orjson.dumps(describe(exc)[1]) + b"\n\n"


OPENAI_SSE: Final = OpenAIFraming()


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request ready for the service: its JSON body, the call, and its model's plan."""

    body: dict[str, Any]
    call: pb.CallRequest
    plan: Plan


TIMEOUT_HEADER = "X-Tether-Timeout-S"
# what the official OpenAI and Anthropic Python clients send: their read timeout, in seconds
# (the Anthropic client's X-Stainless-Timeout can also say NOT_GIVEN)
READ_TIMEOUT_HEADERS = ("X-Stainless-Read-Timeout", "X-Stainless-Timeout")


def _seconds(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < math.inf else None


def caller_timeouts(request: web.Request) -> tuple[float | None, float | None]:
    """The caller's deadline (`X-Tether-Timeout-S`, seconds) and its client's read timeout
    (`X-Stainless-Read-Timeout`, else `X-Stainless-Timeout`); None where not given. A
    malformed X-Tether-Timeout-S is the caller's error; a read timeout that is not a number
    of seconds is ignored."""
    timeout_s = None
    given = request.headers.get(TIMEOUT_HEADER)
    if given is not None:
        timeout_s = _seconds(given)
        if timeout_s is None:
            raise errors.InvalidRequestError(
                f"{TIMEOUT_HEADER} must be a positive number of seconds, not {given[:40]!r}",
                field=TIMEOUT_HEADER,
            )
    for name in READ_TIMEOUT_HEADERS:
        read = request.headers.get(name)
        if read is not None and (seconds := _seconds(read)) is not None:
            return timeout_s, seconds
    return timeout_s, None


def _flag(value: bool) -> str:
    return "true" if value else "false"


class HttpFront:
    """The aiohttp app of the front and its listener on `address` (port 0: a free one)."""

    def __init__(self, address: str, service: SidecarService, token: str | None) -> None:
        self.host, self.port = split_host_port(address)
        self.service = service
        # model name -> its plan: the upstream, its fallbacks, its context fallback
        self.plans = service.pipeline.model_plans
        self._tokens = (f"Bearer {token}".encode(), token.encode()) if token else None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(
            client_max_size=service.config.limits.max_payload_bytes, middlewares=[self._guard]
        )
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_get("/v1/models", self.models)
        anthropic.add_routes(self)

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
        except Exception as exc:
            if isinstance(exc, errors.SidecarError):
                log.info("http call failed: %s: %s", type(exc).__name__, exc.message)
            elif not isinstance(exc, web.HTTPException):
                log.exception("internal error while serving an http call")
            return error_response(request, exc)

    def _admit(self, request: web.Request) -> None:
        if self._tokens is not None:
            bearer, key = self._tokens
            given_bearer = request.headers.get("Authorization", "").encode()
            given_key = request.headers.get("x-api-key", "").encode()
            # both compared, always: the time taken says nothing about either
            if not hmac.compare_digest(given_bearer, bearer) | hmac.compare_digest(given_key, key):
                raise errors.UnauthenticatedError(
                    "missing or wrong token (Authorization: Bearer, or x-api-key)"
                )
        if not self.service.serving:
            raise errors.DrainingError("the sidecar is shutting down")

    # -- handlers --------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        if anthropic.speaks_anthropic(request):
            return web.json_response(anthropic.model_list(self), dumps=_dumps)
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "tether"}
                for model in self.plans]  # fmt: skip
        return web.json_response({"object": "list", "data": data}, dumps=_dumps)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        prepared = await self.prepare(request, "chat")
        return await self.forward(request, prepared, stream=prepared.body.get("stream") is True)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self.forward(request, await self.prepare(request, "embeddings"), stream=False)

    # -- what every API's handlers share ----------------------------------------------------

    async def prepare(self, request: web.Request, operation: str) -> Prepared:
        """The JSON body, and the call of its `model`'s plan."""
        payload = await request.read()  # over client_max_size: 413
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise errors.InvalidRequestError(f"body is not JSON: {exc}", field="body") from None
        if not isinstance(body, dict):
            raise errors.InvalidRequestError("body must be a JSON object", field="body")
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
        return Prepared(body, call, plan)

    async def forward(
        self,
        request: web.Request,
        prepared: Prepared,
        *,
        stream: bool,
        framing: Framing = OPENAI_SSE,
    ) -> web.StreamResponse:
        """Run the call through the service: the answer as it came, or its stream of events."""
        call, plan = prepared.call, prepared.plan
        rpc = f"http.{call.operation}"
        trace = {name: request.headers[name] for name in TRACE_HEADERS if name in request.headers}
        timeout_s, read_timeout_s = caller_timeouts(request)
        if stream:
            return await self._stream(request, prepared, rpc, trace, framing,
                                      (timeout_s, read_timeout_s))  # fmt: skip
        # a unary answer's headers come when the call is over: the client's read timeout
        # is a deadline too
        timeout_s = tighter(timeout_s, read_timeout_s)
        proxied = await self.service.proxy(call, rpc, trace, timeout_s, plan, prepared.body)
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
        prepared: Prepared,
        rpc: str,
        trace: dict[str, str],
        framing: Framing,
        timeouts: tuple[float | None, float | None],
    ) -> web.StreamResponse:
        """Server-sent events; an error before the first chunk is a plain HTTP error, after
        it an in-band error event, and the stream ends without its clean end. `timeouts`:
        the caller's deadline of the whole stream, and its read timeout, which bounds the
        wait for the first chunk (each later gap is the client's own to bound)."""
        info = StreamInfo()
        timeout_s, read_timeout_s = timeouts
        chunks = self.service.proxy_stream(prepared.call, rpc, trace, timeout_s, info,
                                           prepared.plan, prepared.body,
                                           open_timeout_s=read_timeout_s)  # fmt: skip
        async with aclosing(chunks):
            first = await anext(chunks)
            headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                       "X-Tether-Replayed": _flag(first.replayed),
                       "X-Tether-Attempts": str(info.attempts)}  # fmt: skip
            if info.upstream or first.upstream:
                headers["X-Tether-Upstream"] = info.upstream or first.upstream
            response = web.StreamResponse(headers=headers)
            await response.prepare(request)
            await self._write_events(response, first, chunks, framing)
        await response.write_eof()
        return response

    async def _write_events(
        self,
        response: web.StreamResponse,
        first: pb.StreamChunk,
        rest: AsyncIterator[pb.StreamChunk],
        framing: Framing,
    ) -> None:
        chunk = first
        while not chunk.final:
            await response.write(framing.event(chunk.data))
            try:
                chunk = await anext(rest)
            except Exception as exc:
                log.info("http stream failed after its first chunk: %s", exc)
                await response.write(framing.error(exc))
                return
        await response.write(framing.end())
