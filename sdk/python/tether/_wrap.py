"""`tether.wrap_openai` and `tether.wrap_anthropic`: an existing client object goes through
the sidecar's HTTP front, its call sites unchanged.

    client = tether.wrap_openai(OpenAI())          # or AsyncOpenAI(); returns the same object

The object is changed in place: its `base_url` becomes the front (argument, else
$TETHER_HTTP_URL, else http://127.0.0.1:7701/v1; the Anthropic client gets the front's root,
as it adds `/v1/messages` itself), and a request hook on its httpx client adds, to each
request:

- `X-Tether-Run-Id` and `Idempotency-Key` (`run_id:step`) when a tether run is current
  (`@tether.agent`, `tether.run`): model calls take steps of the run like tools do, so a
  resumed run gets its earlier answers from the journal, through the front. The client's own
  retries of one call (counted in its `x-stainless-retry-count` header) keep the call's key;
- `traceparent` of the current span, so the sidecar's spans join the agent's trace;
- `Authorization: Bearer <token>` with the sidecar's token (argument, else $TETHER_TOKEN),
  which the front checks when `auth.token_env` is set. The provider API key the client holds
  is not sent: the sidecar calls the provider with its own.

The client's own retries are turned off (`max_retries=0`) unless asked otherwise: the
sidecar already retries with backoff, budgets and fallbacks, and retries on both sides
multiply. Neither `openai` nor `anthropic` is imported: any client with their shape works.
"""

from __future__ import annotations

import inspect
import os
from contextvars import ContextVar
from typing import Any, Final, TypeVar, cast

from opentelemetry import propagate

from tether._messages import TOKEN_ENV
from tether._runs import current

C = TypeVar("C")
HTTP_URL_ENV: Final = "TETHER_HTTP_URL"
DEFAULT_HTTP_URL: Final = "http://127.0.0.1:7701/v1"
RETRY_HEADER: Final = "x-stainless-retry-count"
OPENAI_CREDENTIALS: Final = ("authorization",)
ANTHROPIC_CREDENTIALS: Final = ("x-api-key", "authorization")

# The key of the last call this context sent: a retry of that call sends it again.
_last_key: ContextVar[str] = ContextVar("tether_http_key", default="")


class RequestHeaders:
    """The request hook of a wrapped client's (sync) httpx client."""

    __slots__ = ("_auth", "_drop")

    def __init__(self, token: str | None, drop: tuple[str, ...]) -> None:
        self._auth = f"Bearer {token}" if token else None
        self._drop = drop

    def apply(self, request: Any) -> None:
        headers = request.headers
        for name in self._drop:
            if name in headers:
                del headers[name]
        if self._auth is not None:
            headers["Authorization"] = self._auth
        scope = current.get()
        if scope is not None and request.method != "GET":
            key = _last_key.get() if headers.get(RETRY_HEADER, "0") != "0" else ""
            if not key:
                key = scope.next_key(headers.get("Idempotency-Key", ""))
                _last_key.set(key)
            headers["X-Tether-Run-Id"] = scope.run_id
            headers["Idempotency-Key"] = key
        propagate.inject(headers)

    def __call__(self, request: Any) -> None:
        self.apply(request)


class AsyncRequestHeaders(RequestHeaders):
    """The request hook of a wrapped client's httpx AsyncClient (which awaits its hooks)."""

    __slots__ = ()

    async def __call__(self, request: Any) -> None:  # type: ignore[override]
        self.apply(request)


def front_root(url: str | None) -> str:
    """The front's root URL: the argument, else $TETHER_HTTP_URL, else the default; with or
    without its `/v1`."""
    chosen = url or os.environ.get(HTTP_URL_ENV) or DEFAULT_HTTP_URL
    return chosen.rstrip("/").removesuffix("/v1")


def _route(
    client: C,
    base_url: str,
    *,
    token: str | None,
    drop: tuple[str, ...],
    max_retries: int | None,
    expected: str,
) -> C:
    target = cast(Any, client)
    http = getattr(target, "_client", None)
    hooks = getattr(http, "event_hooks", None)
    if not hasattr(target, "base_url") or not isinstance(hooks, dict):
        raise TypeError(f"expected {expected} (a client with `base_url` and an httpx client), "
                        f"got {type(client).__qualname__}")  # fmt: skip
    asynchronous = inspect.iscoroutinefunction(getattr(http, "send", None))
    kind = AsyncRequestHeaders if asynchronous else RequestHeaders
    hook = kind(token or os.environ.get(TOKEN_ENV), drop)
    kept = [h for h in hooks.get("request", []) if not isinstance(h, RequestHeaders)]
    cast(Any, http).event_hooks = {**hooks, "request": [*kept, hook]}  # wrapping again: one hook
    target.base_url = base_url
    if max_retries is not None:
        target.max_retries = max_retries
    return client


def wrap_openai(
    client: C, *, url: str | None = None, token: str | None = None, max_retries: int | None = 0
) -> C:
    """Route an `openai.OpenAI` / `AsyncOpenAI` (or compatible) client through the sidecar's
    HTTP front; returns the same object. `max_retries=None` keeps the client's setting."""
    expected = "an openai.OpenAI or AsyncOpenAI client"
    return _route(client, front_root(url) + "/v1", token=token, drop=OPENAI_CREDENTIALS,
                  max_retries=max_retries, expected=expected)  # fmt: skip


def wrap_anthropic(
    client: C, *, url: str | None = None, token: str | None = None, max_retries: int | None = 0
) -> C:
    """Route an `anthropic.Anthropic` / `AsyncAnthropic` client through the sidecar's HTTP
    front (`POST /v1/messages`); returns the same object. `url` may be the front's root or
    its `/v1` URL (as in $TETHER_HTTP_URL)."""
    expected = "an anthropic.Anthropic or AsyncAnthropic client"
    return _route(client, front_root(url), token=token, drop=ANTHROPIC_CREDENTIALS,
                  max_retries=max_retries, expected=expected)  # fmt: skip
