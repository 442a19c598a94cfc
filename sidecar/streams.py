"""A stream after its first chunk: the rest flows under the permits of its attempt, each gap
bounded by the idle timeout; whatever ends it (the last chunk, a failure, the caller leaving)
releases the permits, the bulkhead slot and the tokens, and ends the attempt's span."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from sidecar.policies.base import NEUTRAL, Permit, outcome_of, succeeded
from sidecar.policies.deadline import Deadline
from sidecar.routes import Admission, Route, StreamInfo, error_reason, timed_out
from sidecar.upstreams.base import Chunk, UpstreamResponse


class OpenStream:
    """A stream whose first chunk arrived; the rest flows under the same permits."""

    def __init__(
        self,
        route: Route,
        chunks: AsyncIterator[Chunk],
        first: Chunk,
        permit: Permit | None,
        admission: Admission,
        span: Any,
    ) -> None:
        self.route, self.chunks, self.first = route, chunks, first
        self.permit, self.admission, self.span = permit, admission, span

    async def rest(self, deadline: Deadline, info: StreamInfo) -> AsyncGenerator[Chunk, None]:
        route = self.route
        info.upstream = route.name
        outcome = NEUTRAL
        try:
            chunk: Chunk | None = self.first
            while chunk is not None:
                info.usage = chunk.usage or info.usage
                if chunk.data:  # else it carried the usage alone (see upstreams.openai)
                    info.observer.response_chunk(chunk.data)
                    yield chunk
                chunk = await self._next(deadline)
            outcome = succeeded(info.usage)
        except BaseException as exc:
            outcome = outcome_of(exc)
            route.errors += 1
            if isinstance(exc, Exception):  # not the caller's cancellation or aclose
                info.observer.event("stream.cut", route.name, reason=error_reason(exc))
            raise
        finally:
            try:
                await close_chunks(self.chunks)
            finally:  # a failing aclose must not keep the slot, the probe or the tokens
                route.in_flight -= 1
                if self.permit is not None:
                    self.permit.release(outcome)
                self.admission.release(outcome)
                answer = UpstreamResponse(b"", usage=info.usage)
                info.observer.attempt_end(self.span, answer, outcome.error)

    async def _next(self, deadline: Deadline) -> Chunk | None:
        """The next chunk within the idle bound (`policies.stream.idle_timeout_s`, else the
        per-attempt timeout) and the deadline."""
        timeout_s, by_caller = deadline.cap(self.route.idle_timeout_s)
        try:
            async with self.route.clock.timeout(timeout_s):
                return await anext(self.chunks)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise timed_out(self.route, timeout_s, by_caller) from None


async def close_chunks(chunks: AsyncIterator[Chunk]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()
