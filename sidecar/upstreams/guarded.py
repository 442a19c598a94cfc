"""A dependency the agent calls itself: the sidecar only guards it (BeginCall/EndCall).

It has no transport, so `Call` and `StreamCall` to it are refused as invalid requests; its
policies (rate limit, bulkhead, breaker) still apply to guarded calls.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from sidecar.config import GuardedUpstreamConfig
from sidecar.errors import InvalidRequestError
from sidecar.upstreams.base import Chunk, UpstreamRequest, UpstreamResponse


class GuardedUpstream:
    """Policies without a transport."""

    type = "guarded"
    supports_stream = False

    def __init__(self, name: str, config: GuardedUpstreamConfig) -> None:
        self.name = name
        self.kind = config.kind
        self.timeout_s = config.timeout_s

    def _refusal(self) -> InvalidRequestError:
        return InvalidRequestError(
            f"upstream {self.name!r} is guarded: the agent calls it itself, "
            "through BeginCall/EndCall (the SDK's `guard`)",
            field="upstream",
        )

    def validate(self, request: UpstreamRequest) -> None:
        raise self._refusal()

    async def call(self, request: UpstreamRequest) -> UpstreamResponse:
        raise self._refusal()

    async def stream(self, request: UpstreamRequest) -> AsyncGenerator[Chunk, None]:
        raise self._refusal()
        yield Chunk(b"")  # pragma: no cover - makes this an async generator

    def stats(self) -> dict[str, int]:
        return {}

    async def start(self) -> None:
        """Nothing to open."""

    async def close(self) -> None:
        """Nothing to release."""
