"""A generic JSON tool endpoint: the payload is POSTed as is, the JSON answer returned as is.

The operation travels in `X-Tether-Operation`, the idempotency key in `Idempotency-Key`. The
endpoint does not stream and reports no token usage.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping

import orjson

from sidecar.config import HttpUpstreamConfig
from sidecar.errors import InvalidRequestError
from sidecar.upstreams._aiohttp import PooledUpstream, check_header, not_json
from sidecar.upstreams.base import Chunk, UpstreamRequest, UpstreamResponse


class HttpUpstream(PooledUpstream):
    """A JSON-over-HTTP tool behind one pooled aiohttp session."""

    type = "http"
    supports_stream = False

    def __init__(
        self,
        name: str,
        config: HttpUpstreamConfig,
        *,
        api_key: str | None,
        max_response_bytes: int,
        secret_headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            name,
            config,
            api_key=api_key,
            max_response_bytes=max_response_bytes,
            target=config.url,
            secret_headers=secret_headers,
        )
        self._url = config.url

    def validate(self, request: UpstreamRequest) -> None:
        """Any JSON body will do; only values that must travel in headers are checked."""
        if request.operation:
            check_header(request.operation, field="operation")
        if request.idempotency_key:
            check_header(request.idempotency_key, field="idempotency_key")

    async def call(self, request: UpstreamRequest) -> UpstreamResponse:
        """POST the payload unchanged; the answer must be JSON (any value)."""
        status, body = await self._fetch(self._url, request.payload, self._headers_for(request))
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            raise not_json(self.name, status, body, "parse error", self._secrets) from None
        return UpstreamResponse(payload=body, status=status, usage=None)

    async def stream(self, request: UpstreamRequest) -> AsyncGenerator[Chunk, None]:
        """Always refused: a generic tool endpoint answers in one piece."""
        raise InvalidRequestError(f"upstream {self.name!r} does not stream", field="upstream")
        yield Chunk(b"")  # unreachable; makes this an async generator like the protocol's

    def _headers_for(self, request: UpstreamRequest) -> Mapping[str, str]:
        operation, key = request.operation, request.idempotency_key
        if not operation:
            return super()._headers_for(request)
        check_header(operation, field="operation")
        headers = {**self._headers, "X-Tether-Operation": operation}
        if key:
            check_header(key, field="idempotency_key")
            headers["Idempotency-Key"] = key
        return headers
