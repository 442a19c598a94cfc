"""Plumbing shared by the aiohttp-based adapters (`openai`, `anthropic`, `http`).

One pooled session per adapter, capped body reads, and the one mapping from HTTP statuses and
transport failures to `sidecar.errors` (streams of server-sent events: `_sse`). Nothing here
times out on its own: the caller's `asyncio.timeout` and cancellation are the only clocks.
Every text that may reach a caller is redacted with the adapter's secrets (API key, secret
headers) before it leaves this module.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from http import HTTPStatus
from typing import Any

import aiohttp
import orjson

from sidecar.config import HttpUpstreamBase
from sidecar.errors import (
    InvalidRequestError,
    UpstreamBadResponseError,
    UpstreamClientError,
    UpstreamResponseTooLargeError,
    UpstreamUnavailableError,
)
from sidecar.upstreams.base import Kind, UpstreamRequest

CUT_CHARS = 1024
ERROR_BODY_BYTES = 64 * 1024  # of an error answer, only this much is read: it is cut anyway
_READ_CHUNK = 64 * 1024
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_DELTA_SECONDS = re.compile(r"\d+(?:\.\d+)?")


def make_session(max_connections: int) -> aiohttp.ClientSession:
    """A keep-alive pool of `max_connections`, no cookies, no client-side timeouts."""
    connector = aiohttp.TCPConnector(limit=max_connections)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None),
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


Secrets = tuple[str, ...]


def secrets_of(values: Iterable[str | None]) -> Secrets:
    """The non-empty secrets, longest first: one that contains another is redacted whole."""
    return tuple(sorted({value for value in values if value}, key=len, reverse=True))


def redact(text: str, secrets: Secrets) -> str:
    """`text` with every occurrence of each secret replaced by `***`."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def cut(text: str, n: int = CUT_CHARS) -> str:
    """At most `n` characters of `text`."""
    return text if len(text) <= n else text[:n]


def parse_retry_after(value: str | None) -> float | None:
    """A `Retry-After` header (delta-seconds or HTTP-date) as seconds from now, never negative."""
    if not value or not (value := value.strip()):
        return None
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return max(0.0, when.timestamp() - time.time())


def _decoded(body: bytes, secrets: Secrets) -> str:
    return redact(body.decode("utf-8", "replace"), secrets)


def provider_message(error: Any) -> str | None:
    """The `message` of an OpenAI-style `error` value (object or bare string), if any."""
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) and error else None


def _error_of(body: bytes) -> Any:
    """The `error` value of an error body (OpenAI and Anthropic both use one), else None."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return obj.get("error") if isinstance(obj, dict) else None


def _reason(error: Any, body: bytes) -> str:
    message = provider_message(error)
    return message if message is not None else body.decode("utf-8", "replace").strip()


# How providers say a request does not fit the model's context window (OpenAI's code, and
# the messages of OpenAI, Anthropic, vLLM, Ollama, Together, ...).
_CONTEXT_CODES = {"context_length_exceeded", "string_above_max_length"}
_CONTEXT_MESSAGE = re.compile(
    r"context[ _-]?(length|window)|maximum context|prompt is too long|too many (input )?tokens",
    re.IGNORECASE,
)


def context_exceeded(status: int, error: Any) -> bool:
    """Whether a 4xx answer says the request is longer than the model's context window."""
    if status not in (400, 413, 422):
        return False
    if isinstance(error, dict) and error.get("code") in _CONTEXT_CODES:
        return True
    message = provider_message(error)
    return message is not None and _CONTEXT_MESSAGE.search(message) is not None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "(no reason given)"


def raise_for_status(
    status: int, body: bytes, headers: Mapping[str, str], *, upstream: str, secrets: Secrets
) -> None:
    """Return on 2xx; raise UpstreamClientError on 4xx, UpstreamUnavailableError otherwise."""
    if 200 <= status < 300:
        return
    error = _error_of(body)
    reason = cut(redact(_reason(error, body), secrets)) or _phrase(status)
    message = f"upstream {upstream!r} answered {status}: {reason}"
    retry_after = parse_retry_after(headers.get("Retry-After"))
    if 400 <= status < 500:
        raise UpstreamClientError(
            message,
            upstream=upstream,
            http_status=status,
            body=cut(_decoded(body, secrets)),
            retry_after_s=retry_after,
            context_exceeded=context_exceeded(status, error),
        )
    raise UpstreamUnavailableError(
        message, upstream=upstream, http_status=status, retry_after_s=retry_after
    )


def too_large(upstream: str, limit: int) -> UpstreamResponseTooLargeError:
    return UpstreamResponseTooLargeError(
        f"upstream {upstream!r} answered more than the limit of {limit} bytes", upstream=upstream
    )


def not_json(
    upstream: str, status: int, body: bytes, why: str, secrets: Secrets
) -> UpstreamBadResponseError:
    """The error for a 2xx body that is not the JSON the protocol promises."""
    sample = cut(_decoded(body, secrets), 200)
    return UpstreamBadResponseError(
        f"upstream {upstream!r} answered {status} with a body that is not JSON ({why}): {sample!r}",
        upstream=upstream,
        http_status=status,
    )


async def read_capped(resp: aiohttp.ClientResponse, limit: int, *, upstream: str) -> bytes:
    """The whole body; UpstreamResponseTooLargeError as soon as it exceeds `limit` bytes."""
    # Content-Length counts encoded bytes; only trust it when no decoding will change the size.
    encoded = resp.headers.get("Content-Encoding", "identity").lower() != "identity"
    length = resp.content_length
    if not encoded and length is not None:
        if length > limit:
            raise too_large(upstream, limit)
        return await resp.read()  # the usual case: the length is known and allowed
    body = bytearray()
    async for data in resp.content.iter_chunked(_READ_CHUNK):
        body += data
        if len(body) > limit:
            raise too_large(upstream, limit)
    return bytes(body)


async def read_prefix(resp: aiohttp.ClientResponse, n: int) -> bytes:
    """At most the first `n` bytes of the body, never an error for a longer one."""
    body = bytearray()
    while len(body) < n and (data := await resp.content.read(n - len(body))):
        body += data
    return bytes(body)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        kind = "refused" if refused else "cannot connect"
    elif isinstance(exc, ConnectionRefusedError):
        kind = "refused"
    elif isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        kind = "disconnected"
    else:
        kind = "reset"
    return f"{kind} ({type(exc).__name__}: {exc})" if str(exc) else f"{kind} ({type(exc).__name__})"


TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)  # what `transport_error` maps (not timeouts)


def transport_error(exc: BaseException, upstream: str, secrets: Secrets = ()) -> Exception:
    """The UpstreamError for an aiohttp transport failure (one of TRANSPORT_ERRORS, not a
    TimeoutError: timeouts and cancellation pass unchanged)."""
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | OSError):
        detail = redact(_describe(exc), secrets)
        return UpstreamUnavailableError(
            f"upstream {upstream!r}: connection failed: {detail}", upstream=upstream
        )
    if isinstance(exc, aiohttp.ClientResponseError):  # malformed status line or headers
        return UpstreamBadResponseError(
            f"upstream {upstream!r}: malformed HTTP response: {redact(exc.message, secrets)}",
            upstream=upstream,
        )
    return UpstreamUnavailableError(
        f"upstream {upstream!r}: request failed: {redact(repr(exc), secrets)}",
        upstream=upstream,
    )


@contextmanager
def transport_errors(upstream: str, secrets: Secrets = ()) -> Iterator[None]:
    """Turn aiohttp transport failures into UpstreamError; timeouts and cancellation pass.
    (The per-call paths catch TRANSPORT_ERRORS inline: a generator-based context manager
    per call costs more than the call's own work here.)"""
    try:
        yield
    except TimeoutError:
        raise
    except TRANSPORT_ERRORS as exc:
        raise transport_error(exc, upstream, secrets) from None


def check_header(value: str, *, field: str) -> None:
    """InvalidRequestError when `value` cannot travel in an HTTP header (CR, LF, NUL...)."""
    if _CONTROL_CHARS.search(value) is not None:
        raise InvalidRequestError(f"{field} must not contain control characters", field=field)


def base_headers(
    api_key: str | None, *extra: Mapping[str, str], key_header: str = "Authorization"
) -> dict[str, str]:
    """The headers every request carries: JSON, the key when set (`Authorization: Bearer`,
    or the key alone in `key_header`), then the others in order."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        bearer = key_header == "Authorization"
        headers[key_header] = f"Bearer {api_key}" if bearer else api_key
    for more in extra:
        headers.update(more)
    return headers


def payload_json(body: Any) -> bytes:
    """`body` as JSON bytes; InvalidRequestError when it cannot be encoded."""
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as exc:
        raise InvalidRequestError(f"payload cannot be re-encoded: {exc}", field="payload") from None


def unary_payload(request: UpstreamRequest, drop: tuple[str, ...] = ()) -> bytes:
    """The payload unchanged, unless it asks to stream: then `stream` off, `drop` keys gone."""
    body = request.body
    if not isinstance(body, dict) or not body.get("stream"):
        return request.payload
    unary = {key: value for key, value in body.items() if key not in drop}
    unary["stream"] = False
    return payload_json(unary)


class PooledUpstream:
    """State and lifecycle shared by the aiohttp adapters: one pooled session, static headers."""

    def __init__(
        self,
        name: str,
        config: HttpUpstreamBase,
        *,
        api_key: str | None,
        max_response_bytes: int,
        target: str,
        secret_headers: Mapping[str, str] | None = None,
        key_header: str = "Authorization",
        protocol_headers: Mapping[str, str] | None = None,
    ) -> None:
        """`secret_headers`: the resolved values of `headers_env`, sent and always redacted;
        `key_header`: where the API key travels; `protocol_headers`: what the API itself
        requires (the config's headers may override them)."""
        self.name = name
        self.kind: Kind = config.kind
        self.timeout_s = config.timeout_s
        self.target_url = target  # where it calls (telemetry: server.address)
        secret_headers = secret_headers or {}
        self._secrets = secrets_of([api_key, *secret_headers.values()])
        self._limit = max_response_bytes
        self._max_connections = config.max_connections
        self._headers = base_headers(
            api_key, protocol_headers or {}, config.headers, secret_headers, key_header=key_header
        )
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, url={self.target_url!r})"

    async def start(self) -> None:
        """Open the connection pool; must run inside the event loop."""
        if self._session is None:
            self._session = make_session(self._max_connections)

    async def close(self) -> None:
        """Close the pool and its connections."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def stats(self) -> dict[str, int]:
        return {}

    def _headers_for(self, request: UpstreamRequest) -> Mapping[str, str]:
        key = request.idempotency_key
        if not key:
            return self._headers
        check_header(key, field="idempotency_key")
        return {**self._headers, "Idempotency-Key": key}

    def _pool(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"upstream {self.name!r} is not started")
        return self._session

    async def _post(
        self, url: str, data: bytes, headers: Mapping[str, str]
    ) -> aiohttp.ClientResponse:
        """POST `data`; the response once its headers arrived (redirects are not followed)."""
        try:
            return await self._pool().post(url, data=data, headers=headers, allow_redirects=False)
        except TimeoutError:
            raise
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.name, self._secrets) from None

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        """The capped body of a 2xx, the first bytes of any other; closes the link on failure."""
        try:
            if 200 <= resp.status < 300:
                body = await read_capped(resp, self._limit, upstream=self.name)
            else:
                body = await read_prefix(resp, min(self._limit, ERROR_BODY_BYTES))
        except TimeoutError:
            resp.close()  # abort on the wire: the upstream sees the disconnect
            raise
        except TRANSPORT_ERRORS as exc:
            resp.close()
            raise transport_error(exc, self.name, self._secrets) from None
        except BaseException:
            resp.close()
            raise
        resp.release()  # pooled again only when the body was read to its end
        return body

    async def _fetch(self, url: str, data: bytes, headers: Mapping[str, str]) -> tuple[int, bytes]:
        """POST, read the capped body, map non-2xx to errors; `(status, body)`."""
        resp = await self._post(url, data, headers)
        body = await self._read(resp)
        raise_for_status(resp.status, body, resp.headers, upstream=self.name, secrets=self._secrets)
        return resp.status, body

    def _json_object(self, body: bytes, status: int) -> dict[str, Any]:
        """`body` parsed as a JSON object; UpstreamBadResponseError when it is not one."""
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise not_json(self.name, status, body, "parse error", self._secrets) from None
        if not isinstance(obj, dict):
            raise not_json(self.name, status, body, "not an object", self._secrets)
        return obj
