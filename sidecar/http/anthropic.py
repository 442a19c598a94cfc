"""Anthropic's Messages API on the HTTP front: `POST /v1/messages`, unary or streamed.

The body's `model` picks a route exactly as chat's does (`HttpFront.prepare`), and the call
runs through the same service path (journal, policies, fallbacks, telemetry) with operation
`messages`. The route's upstream must take Anthropic's request shape (type `anthropic`, or
the built-in mock); one that takes OpenAI's is a 400 naming the model and why.

Streams are Anthropic's server-sent events, `event: <type>` and the event's JSON: the
upstream's events as they come (the adapter keeps `ping` and `message_stop` back), then
`message_stop` once the call has completed. A failure after the first event ends the stream
with an in-band `event: error` in Anthropic's shape, never a `message_stop` (the pipeline
counts it in `tether_streams_cut_total`). Errors use Anthropic's error JSON
(`sidecar.http.errors.describe_anthropic`) on this path and on any request that carries
`anthropic-version`, as Anthropic's client does; its `GET /v1/models` lists, in Anthropic's
shape, the routes it can use here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import orjson
from aiohttp import web

from sidecar import errors
from sidecar.http.errors import describe_anthropic
from sidecar.upstreams.anthropic import OPERATION

if TYPE_CHECKING:
    from sidecar.http.front import HttpFront
    from sidecar.routes import Plan, Route

PATH: Final = "/v1/messages"
TAKES_MESSAGES: Final = frozenset({"anthropic", "mock"})  # upstream types that take the shape
_TYPE_PREFIX: Final = b'{"type":"'
_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_EPOCH: Final = "1970-01-01T00:00:00Z"


def speaks_anthropic(request: web.Request) -> bool:
    """Whether the caller speaks Anthropic's API (and wants its error shape)."""
    return request.path.startswith(PATH) or "anthropic-version" in request.headers


def event_name(data: bytes) -> bytes:
    """An event's type, read from its JSON without parsing it when `type` comes first (as
    the API, the mock and the journal write it); `unknown` when it has no plain one."""
    if data.startswith(_TYPE_PREFIX):
        end = data.find(b'"', len(_TYPE_PREFIX))
        name = data[len(_TYPE_PREFIX) : end]
        if end > 0 and name.replace(b"_", b"").isalnum():
            return name
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return b"unknown"
    kind = obj.get("type") if isinstance(obj, dict) else None
    if isinstance(kind, str) and kind.isascii() and kind.replace("_", "").isalnum():
        return kind.encode()
    return b"unknown"


class AnthropicFraming:
    """`event: <type>` with its data, then `message_stop`; an error is `event: error`."""

    def event(self, data: bytes) -> bytes:
        return b"event: " + event_name(data) + b"\ndata: " + data + b"\n\n"

    def end(self) -> bytes:
        return _STOP

    def error(self, exc: BaseException) -> bytes:
        return b"event: error\ndata: " + orjson.dumps(describe_anthropic(exc)[1]) + b"\n\n"


ANTHROPIC_SSE: Final = AnthropicFraming()


def _refusing(plan: Plan) -> Route | None:
    """The first route of `plan` that does not take Messages requests, if any."""
    routes = [*plan.candidates, *([plan.context] if plan.context is not None else [])]
    return next((r for r in routes if r.upstream.type not in TAKES_MESSAGES), None)


def model_list(front: HttpFront) -> dict[str, Any]:
    """The models whose plans take Messages requests, as Anthropic's model list (one page)."""
    ids = [model for model, plan in front.plans.items() if _refusing(plan) is None]
    data = [{"type": "model", "id": model, "display_name": model, "created_at": _EPOCH}
            for model in ids]  # fmt: skip
    first, last = (ids[0], ids[-1]) if ids else (None, None)
    return {"data": data, "has_more": False, "first_id": first, "last_id": last}


def add_routes(front: HttpFront) -> None:
    """Serve `POST /v1/messages` on the front."""

    async def messages(request: web.Request) -> web.StreamResponse:
        prepared = await front.prepare(request, OPERATION)
        model = prepared.body["model"]
        refusing = _refusing(prepared.plan)
        if refusing is not None:
            raise errors.InvalidRequestError(
                f"model {model!r} is served by upstream {refusing.name!r} (type "
                f"{refusing.upstream.type}), which does not take Anthropic Messages requests; "
                f"call it through POST /v1/chat/completions, or route {model!r} to anthropic "
                "upstreams",
                field="model",
            )
        stream = prepared.body.get("stream") is True
        return await front.forward(request, prepared, stream=stream, framing=ANTHROPIC_SSE)

    front.app.router.add_post(PATH, messages)
