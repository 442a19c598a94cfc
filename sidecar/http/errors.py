"""The one table from the sidecar's errors to HTTP errors, in OpenAI's or Anthropic's shape.

It starts from `sidecar.status.classify` (the gRPC code and the stable reason), so the HTTP
front and the gRPC front can never disagree about what an error is: `http_error` gives the
status and what to say, `describe` writes it as OpenAI's body
`{"error": {"message", "type", "param", "code"}}`, `describe_anthropic` as Anthropic's
`{"type": "error", "error": {"type", "message"}}`, its type the one Anthropic uses for the
status (`sidecar.upstreams.anthropic.error_type`: 400 invalid_request_error, 401
authentication_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error, 500 and
502 api_error, 503 and 529 overloaded_error, 504 timeout_error). Anthropic's own error from an
upstream 4xx passes unchanged, and its 529 (overloaded, after the retries) keeps its status.
A refusal that says when to come back carries `Retry-After` in whole seconds, rounded up; an
error after upstream attempts says how many in `X-Tether-Attempts`.

| reason (gRPC code)                          | HTTP              | type / code            |
| ------------------------------------------- | ----------------- | ---------------------- |
| INVALID_REQUEST (INVALID_ARGUMENT)          | 400               | invalid_request_error  |
| UNKNOWN_UPSTREAM, unknown model (NOT_FOUND) | 404               | / model_not_found      |
| NOT_FOUND                                   | 404               | / not_found            |
| PAYLOAD_TOO_LARGE                           | 413               | / payload_too_large    |
| UNAUTHENTICATED                             | 401               | authentication_error   |
| RATE_LIMITED (RESOURCE_EXHAUSTED)           | 429 + Retry-After | rate_limit_error       |
| OVERLOADED (RESOURCE_EXHAUSTED)             | 503 + Retry-After | server_error           |
| CIRCUIT_OPEN (UNAVAILABLE)                  | 503 + Retry-After | server_error           |
| DRAINING, JOURNAL_UNAVAILABLE (UNAVAILABLE) | 503               | server_error           |
| UPSTREAM_TIMEOUT (DEADLINE_EXCEEDED)        | 504               | timeout_error          |
| UPSTREAM_UNAVAILABLE, _BAD_RESPONSE, _TOO_LARGE | 502           | upstream_error         |
| UPSTREAM_CLIENT_ERROR (upstream 4xx)        | the upstream's    | the provider's         |
| NON_DETERMINISTIC_REPLAY, OUTCOME_UNKNOWN   | 409               | conflict_error         |
| NOT_IMPLEMENTED                             | 501               | server_error           |
| INTERNAL (anything else)                    | 500               | server_error           |

The `code` of each row is in `TABLE` below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiohttp import web

from sidecar import errors, status
from sidecar.upstreams.anthropic import ERROR_STATUS, error_type

# reason -> (HTTP status, OpenAI error type, code)
TABLE: Final[dict[str, tuple[int, str, str]]] = {
    "INVALID_REQUEST": (400, "invalid_request_error", "invalid_request"),
    "UNKNOWN_UPSTREAM": (404, "invalid_request_error", "model_not_found"),
    "NOT_FOUND": (404, "invalid_request_error", "not_found"),
    "PAYLOAD_TOO_LARGE": (413, "invalid_request_error", "payload_too_large"),
    "UNAUTHENTICATED": (401, "authentication_error", "invalid_api_key"),
    "RATE_LIMITED": (429, "rate_limit_error", "rate_limit_exceeded"),
    "OVERLOADED": (503, "server_error", "overloaded"),
    "CIRCUIT_OPEN": (503, "server_error", "circuit_open"),
    "STATE_UNAVAILABLE": (503, "server_error", "state_unavailable"),
    "DRAINING": (503, "server_error", "draining"),
    "JOURNAL_UNAVAILABLE": (503, "server_error", "journal_unavailable"),
    "UPSTREAM_TIMEOUT": (504, "timeout_error", "upstream_timeout"),
    "UPSTREAM_UNAVAILABLE": (502, "upstream_error", "upstream_unavailable"),
    "UPSTREAM_BAD_RESPONSE": (502, "upstream_error", "upstream_bad_response"),
    "UPSTREAM_TOO_LARGE": (502, "upstream_error", "upstream_too_large"),
    "UPSTREAM_CLIENT_ERROR": (400, "invalid_request_error", "upstream_client_error"),
    "NON_DETERMINISTIC_REPLAY": (409, "conflict_error", "non_deterministic_replay"),
    "OUTCOME_UNKNOWN": (409, "conflict_error", "outcome_unknown"),
    "NOT_IMPLEMENTED": (501, "server_error", "not_implemented"),
}
INTERNAL: Final = (500, "server_error", "internal_error")
# aiohttp's own refusals (body over client_max_size, no such path, wrong method)
AIOHTTP_CODES: Final = {413: "payload_too_large", 404: "not_found", 405: "method_not_allowed"}
OVERLOADED_STATUS: Final = 529  # Anthropic's "overloaded": passed on as it is


@dataclass(frozen=True, slots=True)
class HttpError:
    """What an exception means to an HTTP caller, before it takes an API's shape."""

    status: int
    type: str  # OpenAI's error type
    code: str
    message: str
    reason: str = "HTTP"  # sidecar.status's reason ("HTTP": aiohttp's own refusal)
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    provider: dict[str, Any] = field(default_factory=dict)  # an upstream 4xx's own `error`
    upstream_status: int = 0  # the status the upstream answered, when it did


class UnknownModelError(errors.UnknownUpstreamError):
    """The request names a model no route serves (reason UNKNOWN_UPSTREAM, HTTP 404)."""

    def __init__(self, model: str, known: list[str]) -> None:
        super().__init__(model, known)
        names = ", ".join(sorted(known)) or "none"
        self.message = f"The model {model!r} does not exist; this sidecar serves: {names}"
        self.args = (self.message,)


def _provider_error(exc: BaseException) -> dict[str, Any]:
    """The upstream's own OpenAI-style `error` object, when its 4xx body carried one."""
    body = getattr(exc, "body", "") or exc_metadata(exc).get("upstream_body", "")
    try:
        parsed = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return {}
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def exc_metadata(exc: BaseException) -> dict[str, str]:
    return exc.metadata() if isinstance(exc, errors.SidecarError) else {}


def http_error(exc: BaseException) -> HttpError:
    """The HTTP status, headers and message for an exception, from the one table."""
    if isinstance(exc, web.HTTPException):
        code = AIOHTTP_CODES.get(exc.status, "invalid_request")
        return HttpError(exc.status, "invalid_request_error", code, exc.text or exc.reason)
    _, reason = status.classify(exc)
    http_status, kind, code = TABLE.get(reason, INTERNAL)
    internal = not isinstance(exc, errors.SidecarError)
    message = "internal error in the sidecar" if internal else getattr(exc, "message", str(exc))
    param: str | None = getattr(exc, "field", "") or None
    upstream_status = int(exc_metadata(exc).get("http_status") or 0)
    provider: dict[str, Any] = {}
    if reason == "UPSTREAM_CLIENT_ERROR":
        http_status = upstream_status or http_status
        provider = _provider_error(exc)
        if isinstance(provider.get("message"), str) and provider["message"]:
            message = provider["message"]
        kind = _text(provider.get("type")) or kind
        code = _text(provider.get("code")) or code
        param = _text(provider.get("param"))
    headers = {}
    attempts = getattr(exc, "attempts", 0)
    if isinstance(attempts, int) and attempts > 0:
        headers["X-Tether-Attempts"] = str(attempts)
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None and retry_after >= 0:
        headers["Retry-After"] = str(math.ceil(retry_after))
    return HttpError(http_status, kind, code, message, reason, param, headers, provider,
                     upstream_status)  # fmt: skip


def describe(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, OpenAI error body and extra headers for an exception."""
    err = http_error(exc)
    error = {"message": err.message, "type": err.type, "param": err.param, "code": err.code}
    return err.status, {"error": error}, err.headers


def describe_anthropic(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, Anthropic error body and extra headers for an exception."""
    err = http_error(exc)
    http_status = err.status
    if err.reason == "UPSTREAM_UNAVAILABLE" and err.upstream_status == OVERLOADED_STATUS:
        http_status = OVERLOADED_STATUS  # its callers know to back off on it
    provider = err.provider
    if provider.get("type") in ERROR_STATUS and _text(provider.get("message")):
        error = provider  # Anthropic's own error, unchanged (its details included)
    else:
        error = {"type": error_type(http_status), "message": err.message}
    return http_status, {"type": "error", "error": error}, err.headers
