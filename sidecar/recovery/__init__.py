"""Mid-stream recovery: a stream that fails after chunks reached the caller goes on, on the
same route once and then on the plan's later candidates, as one whole answer, never with a
word duplicated, lost or altered; or it ends with the original failure.

Each candidate says how it may take over (`upstreams.<name>.continuation`):

- `prefill`: the original request with the delivered text as the start of the assistant's
  answer, streaming only the continuation. A candidate that refuses the prefill (a 4xx) is
  asked again with `replay`; that refusal never reaches the caller.
- `replay` (the default): the original request again; the new answer is held back until it
  covers what was delivered, and passed on from there only if the delivered answer is an
  exact prefix of it (text and tool-call arguments alike).
- `none`: never used to recover.

Recovery runs only for model streams of a known shape (OpenAI chat chunks, Anthropic
Messages events), on idempotent candidates, while the caller's deadline lasts; each
recovery gets the plan's budget (`total_timeout_s`) to get its stream flowing. An answer of
several choices (`n > 1`) is not recovered, and says so in a span event. Each recovery's
outcome (`continued`, `replayed`, `gave_up`) is a span event `stream.recovery` and a count
in `tether_stream_recoveries`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Protocol

from sidecar import errors
from sidecar.policies.deadline import Deadline
from sidecar.recovery.base import Answer, Continuation, Diverged
from sidecar.recovery.openai import OpenAIAnswer
from sidecar.routes import Plan, Route, StreamInfo, error_reason
from sidecar.upstreams.base import Chunk, UpstreamRequest

log = logging.getLogger("tether.sidecar.recovery")

__all__ = ["Answer", "Continuation", "Diverged", "Opener", "answer_for", "recovering"]


class _Opened(Protocol):
    """What `Opener` returns: an open stream (`sidecar.streams.OpenStream`)."""

    @property
    def route(self) -> Route: ...

    def rest(self, deadline: Deadline, info: StreamInfo) -> AsyncGenerator[Chunk, None]: ...


# (route, request, deadline, info) -> the stream opened on it, first chunk received
Opener = Callable[[Route, UpstreamRequest, Deadline, StreamInfo], Awaitable[_Opened]]


def answer_for(request: UpstreamRequest) -> Answer | None:
    """A follower of the answer's shape, for the streams recovery knows."""
    if request.operation in ("chat", ""):
        return OpenAIAnswer()
    if request.operation == "messages":
        from sidecar.recovery.anthropic import AnthropicAnswer

        return AnthropicAnswer()
    return None


@dataclass(slots=True)
class _Takeover:
    opened: _Opened
    continuation: Continuation
    mode: str  # "prefill" or "replay"


@dataclass(slots=True)
class _Recovery:
    """One call's recovery so far: its first failure and the routes that tried to take over."""

    plan: Plan
    request: UpstreamRequest
    answer: Answer
    failure: errors.UpstreamError
    tried: set[str] = field(default_factory=set)


async def recovering(
    opened: _Opened,
    plan: Plan,
    request: UpstreamRequest,
    deadline: Deadline,
    info: StreamInfo,
    open_route: Opener,
) -> AsyncGenerator[Chunk, None]:
    """The chunks of `opened`, and after a failure the rest of the answer from a recovery."""
    answer = answer_for(request) if _recoverable_plan(plan) else None
    if answer is None:
        async with aclosing(opened.rest(deadline, info)) as rest:
            async for chunk in rest:
                yield chunk
        return
    stream = opened.rest(deadline, info)
    continuation: Continuation | None = None
    recovery: _Recovery | None = None
    mode = ""
    while True:
        try:
            async with aclosing(stream):
                async for chunk in stream:
                    if continuation is None:
                        answer.feed(chunk.data)
                        yield chunk
                        continue
                    for data in continuation.push(chunk.data):
                        answer.feed(data)
                        yield Chunk(data, chunk.usage)
                if continuation is not None:
                    continuation.end()
            if recovery is not None:
                _outcome(info, opened.route, "continued" if mode == "prefill" else "replayed")
            return
        except (errors.UpstreamError, Diverged) as exc:
            if answer.complete:  # failed after its end reached the caller: it is whole
                log.info("stream of %r failed after its end was delivered: complete",
                         opened.route.name)  # fmt: skip
                return
            if recovery is None:
                if not isinstance(exc, errors.UpstreamError):
                    raise
                recovery = _Recovery(plan, request, answer, exc)
            if answer.refusal is not None:
                info.observer.event("stream.recovery", opened.route.name, outcome="refused",
                                    reason=answer.refusal)  # fmt: skip
                raise recovery.failure from None
            takeover = await _take_over(recovery, opened.route, deadline, info, open_route)
            if takeover is None:
                _outcome(info, opened.route, "gave_up")
                raise recovery.failure from None
            opened, continuation, mode = takeover.opened, takeover.continuation, takeover.mode
            stream = opened.rest(deadline, info)


def _recoverable_plan(plan: Plan) -> bool:
    return any(route.continuation != "none" for route in plan.candidates)


def _outcome(info: StreamInfo, route: Route, outcome: str) -> None:
    info.observer.event("stream.recovery", route.name, outcome=outcome)


def _order(plan: Plan, cut: Route) -> list[Route]:
    """Who may take over after `cut` failed: itself once, then the candidates after it."""
    following = list(plan.candidates)
    after = following[following.index(cut) + 1 :] if cut in following else []
    return [cut, *after]


async def _take_over(
    recovery: _Recovery, cut: Route, deadline: Deadline, info: StreamInfo, open_route: Opener
) -> _Takeover | None:
    """The first candidate not tried yet that opens a stream to go on with, else None."""
    failure, plan = recovery.failure, recovery.plan
    if deadline.expired() or getattr(failure, "caller_deadline", False):
        return None
    left = deadline.remaining()
    opening = Deadline.within(deadline.clock, left if deadline.caller else None, plan.budget_s)
    for target in _order(plan, cut):
        if target.name in recovery.tried or target.continuation == "none":
            continue
        if not target.idempotent or opening.expired():
            continue
        recovery.tried.add(target.name)
        info.observer.event("stream.recovery.start", target.name, reason=error_reason(failure),
                            continuation=target.continuation)  # fmt: skip
        takeover = await _open_one(target, recovery, opening, info, open_route)
        if takeover is not None:
            return takeover
    return None


async def _open_one(
    target: Route, recovery: _Recovery, opening: Deadline, info: StreamInfo, open_route: Opener
) -> _Takeover | None:
    """`target`'s stream: a prefill first when it declares one and the answer allows it
    (refused with a 4xx: a replay instead), else a replay."""
    request, answer = recovery.request, recovery.answer
    if target.continuation == "prefill":
        made = answer.prefill(request, target.prefill_params)
        if made is not None:
            prefilled, continuation = made
            try:
                return _Takeover(await open_route(target, prefilled, opening, info),
                                 continuation, "prefill")  # fmt: skip
            except errors.UpstreamClientError as exc:
                log.info("upstream %r refused the prefill (%s); replaying instead",
                         target.name, error_reason(exc))  # fmt: skip
            except errors.SidecarError:
                return None
    try:
        return _Takeover(await open_route(target, request, opening, info), answer.replay(),
                         "replay")  # fmt: skip
    except errors.SidecarError as exc:
        log.info("upstream %r could not take the stream over: %s", target.name,
                 type(exc).__name__)  # fmt: skip
        return None
