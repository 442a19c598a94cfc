"""The one table from the sidecar's errors to OpenAI-shaped HTTP errors.

It starts from `sidecar.status.classify` (the gRPC code and the stable reason), so the HTTP
front and the gRPC front can never disagree about what an error is. The body is OpenAI's
`{"error": {"message", "type", "param", "code"}}`; a refusal that says when to come back
carries `Retry-After` in whole seconds, rounded up.

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
from typing import Any, Final

import orjson

from sidecar import errors, status

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


def describe(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, OpenAI error body and extra headers for an exception."""
    _, reason = status.classify(exc)
    http_status, kind, code = TABLE.get(reason, INTERNAL)
    internal = not isinstance(exc, errors.SidecarError)
    message = "internal error in the sidecar" if internal else getattr(exc, "message", str(exc))
    param: str | None = getattr(exc, "field", "") or None
    if reason == "UPSTREAM_CLIENT_ERROR":
        http_status = int(exc_metadata(exc).get("http_status") or http_status)
        provider = _provider_error(exc)
        if isinstance(provider.get("message"), str) and provider["message"]:
            message = provider["message"]
        kind = _text(provider.get("type")) or kind
        code = _text(provider.get("code")) or code
        param = _text(provider.get("param"))
    headers = {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None and retry_after >= 0:
        headers["Retry-After"] = str(math.ceil(retry_after))
    error = {"message": message, "type": kind, "param": param, "code": code}
    return http_status, {"error": error}, headers
