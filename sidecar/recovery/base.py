"""What mid-stream recovery needs of an API's stream shape, and the errors it raises.

An `Answer` follows what the caller has received of a streamed answer, by channel (the text,
each tool call's name and arguments...). From it come the two ways to go on after a cut:

- `prefill(request)`: the original request with the delivered text as the start of the
  assistant's answer (None when what was delivered cannot be written so: tool calls, say),
  and a `Continuation` that turns the new stream's chunks into the rest of the answer;
- `replay()`: a `Continuation` for the original request sent again, which holds the new
  answer back until it covers everything delivered, checks that the delivered answer is an
  exact prefix of it (channel by channel), then passes on only what is new.

A continuation raises `Diverged` when the new answer does not continue the delivered one;
the caller then gets the original failure, never an altered answer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Any, Protocol

import orjson

from sidecar.upstreams.base import UpstreamRequest


class Diverged(Exception):
    """The new answer does not continue what the caller has received."""


class Continuation(Protocol):
    """Turns the chunks of a new stream into the rest of the delivered answer."""

    def push(self, data: bytes) -> list[bytes]:
        """What to pass on for this chunk of the new stream (nothing while holding it back);
        Diverged when it contradicts what was delivered."""
        ...

    def end(self) -> None:
        """The new stream is complete: Diverged when it never covered what was delivered."""
        ...


class Answer(Protocol):
    """What the caller has received of one streamed answer."""

    @property
    def refusal(self) -> str | None:
        """Why this answer cannot be recovered at all (None: it can)."""
        ...

    @property
    def complete(self) -> bool:
        """The caller has the whole answer already (its end was delivered, the stream failed
        after it): nothing to recover, nothing more to send."""
        ...

    def feed(self, data: bytes) -> None:
        """One chunk the caller received."""
        ...

    def prefill(
        self, request: UpstreamRequest, params: dict[str, Any]
    ) -> tuple[UpstreamRequest, Continuation] | None:
        """The request that continues the delivered text (with `params` merged into its
        body), and how to pass its stream on; None when prefill cannot express it."""
        ...

    def replay(self) -> Continuation:
        """How to pass on the stream of the original request sent again."""
        ...


def prefilled(
    request: UpstreamRequest, params: dict[str, Any], text: str, *, rstrip: bool = False
) -> tuple[UpstreamRequest, str] | None:
    """`request` with `text` as the start of the assistant's answer: appended to the caller's
    own trailing assistant message when there is one (a prefill of its own), else a new one;
    `params` merged into the body. With `rstrip`, the prefill leaves out its trailing white
    space, which is returned. None when the request cannot be extended so."""
    body = request.body
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(messages, list):
        return None
    last = messages[-1] if messages else None
    turn: dict[str, Any] = {"role": "assistant"}
    if isinstance(last, dict) and last.get("role") == "assistant":
        if not isinstance(last.get("content"), str):
            return None  # the caller's own prefill, in parts: not extended
        turn, text, messages = last, last["content"] + text, messages[:-1]
    prefill = text.rstrip() if rstrip else text
    body = {**body, **params, "messages": [*messages, {**turn, "content": prefill}]}
    return replace(request, body=body, payload=orjson.dumps(body)), text[len(prefill) :]


def overlap(delivered: str, sent: int, piece: str) -> str:
    """The part of `piece` (which starts at offset `sent` of a channel's new text) beyond
    what was `delivered` on that channel; Diverged when the overlap differs."""
    end = min(len(delivered), sent + len(piece))
    if sent < end and piece[: end - sent] != delivered[sent:end]:
        raise Diverged
    return piece[max(0, end - sent) :]


class HeldReplay(ABC):
    """A replay's continuation: each chunk of the new answer trimmed of what the caller
    already has (`_trim`), held back until the new answer covers the delivered one
    (`_covered`), then passed on."""

    def __init__(self) -> None:
        self.held: list[bytes] = []

    @abstractmethod
    def _trim(self, data: bytes) -> bytes:
        """The chunk without what the caller already has (b"": nothing left); Diverged when
        it contradicts what was delivered."""

    @abstractmethod
    def _covered(self) -> bool:
        """Whether the new answer so far covers everything delivered."""

    def push(self, data: bytes) -> list[bytes]:
        trimmed = self._trim(data)
        if trimmed:
            self.held.append(trimmed)
        if not self._covered():
            return []
        held, self.held = self.held, []
        return held

    def end(self) -> None:
        if not self._covered():
            raise Diverged
