"""Mid-stream recovery for OpenAI's chat completion chunks (see `sidecar.recovery.base`).

Channels of choice 0's `delta`: `content`, `refusal`, `reasoning_content` (what reasoning
servers stream), and each tool call's `name` and `arguments` by its `index`. A tool call's
`id` and `type` are passed on once, with its first delta. `n > 1` (several choices) is not
recovered: the clear reason is `refusal`.
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.recovery.base import Continuation, Diverged, HeldReplay, overlap
from sidecar.upstreams.base import UpstreamRequest

TEXT_CHANNELS = ("content", "refusal", "reasoning_content")
Channel = str | tuple[int, str]  # a text channel, or (tool index, "name" | "arguments")


def _choice(obj: Any) -> dict[str, Any] | None:
    """Choice 0 of a chunk (None for a chunk without choices, such as the usage chunk);
    Diverged for a chunk of several choices."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices:
        return None
    if len(choices) > 1 or not isinstance(choices[0], dict) or choices[0].get("index", 0):
        raise Diverged
    return choices[0]


def _pieces(delta: dict[str, Any]) -> list[tuple[Channel, str]]:
    pieces: list[tuple[Channel, str]] = []
    for name in TEXT_CHANNELS:
        text = delta.get(name)
        if isinstance(text, str) and text:
            pieces.append((name, text))
    calls = delta.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(call.get("index", 0), int):
            continue
        for part in ("name", "arguments"):
            text = function.get(part)
            if isinstance(text, str) and text:
                pieces.append(((call.get("index", 0), part), text))
    return pieces


class OpenAIAnswer:
    """What the caller has received of a chat completion stream, by channel."""

    def __init__(self) -> None:
        self._parts: dict[Channel, list[str]] = {}  # joined only when a recovery needs them
        self.tools: set[int] = set()  # tool calls whose first delta (id, type) was sent
        self.finished = False  # the caller has choice 0's finish_reason
        self._refusal: str | None = None

    @property
    def refusal(self) -> str | None:
        return self._refusal

    @property
    def channels(self) -> dict[Channel, str]:
        """Each channel's text so far."""
        return {channel: "".join(parts) for channel, parts in self._parts.items()}

    def feed(self, data: bytes) -> None:
        try:
            choice = _choice(orjson.loads(data))
        except (orjson.JSONDecodeError, Diverged):
            self._refusal = "n > 1: an answer of several choices is not recovered"
            return
        if choice is not None and choice.get("finish_reason"):
            self.finished = True
        delta = choice.get("delta") if choice is not None else None
        if not isinstance(delta, dict):
            return
        for channel, text in _pieces(delta):
            self._parts.setdefault(channel, []).append(text)
            if isinstance(channel, tuple):
                self.tools.add(channel[0])

    def prefill(
        self, request: UpstreamRequest, params: dict[str, Any]
    ) -> tuple[UpstreamRequest, Continuation] | None:
        text = "".join(self._parts.get("content", ()))
        body = request.body
        if set(self._parts) != {"content"} or not text or self.finished:
            return None
        if not isinstance(body, dict):
            return None
        messages = [*body.get("messages", []), {"role": "assistant", "content": text}]
        body = {**body, **params, "messages": messages}
        return UpstreamRequest(request.operation, orjson.dumps(body), body,
                               request.idempotency_key, request.run_id,
                               request.labels), _Prefilled()  # fmt: skip

    def replay(self) -> Continuation:
        return _Replayed(self)


class _Prefilled:
    """The stream of a prefilled request is the rest of the answer: passed on as it comes,
    but for its opening role-only delta."""

    def push(self, data: bytes) -> list[bytes]:
        choice = _choice(orjson.loads(data))
        if choice is None:
            return [data]
        delta = choice.get("delta")
        opening = isinstance(delta, dict) and not _pieces(delta)
        return [] if opening and not choice.get("finish_reason") else [data]

    def end(self) -> None:
        return None


class _Replayed(HeldReplay):
    """The original request's new answer: held back until it covers what was delivered,
    each channel checked to begin with the delivered text, then only what is new."""

    def __init__(self, answer: OpenAIAnswer) -> None:
        super().__init__()
        self.delivered = answer.channels
        self.finished = answer.finished  # the caller has the whole answer but its end
        self.started = set(answer.tools)  # tool calls the caller has seen begin
        self.sent: dict[Channel, int] = {}  # how far the new answer is, by channel

    def _covered(self) -> bool:
        return all(self.sent.get(c, 0) >= len(text) for c, text in self.delivered.items())

    def _trim(self, data: bytes) -> bytes:
        """The chunk without what the caller already has; b"" when nothing is left."""
        obj = orjson.loads(data)
        choice = _choice(obj)
        if choice is None:
            return data
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        new: dict[str, Any] = {}
        calls: dict[int, dict[str, Any]] = {}
        for channel, piece in _pieces(delta):
            sent = self.sent.get(channel, 0)
            rest = overlap(self.delivered.get(channel, ""), sent, piece)
            self.sent[channel] = sent + len(piece)
            if rest and self.finished:
                raise Diverged  # longer than the answer the caller saw end
            if not rest:
                continue
            if isinstance(channel, str):
                new[channel] = rest
            else:
                call = calls.setdefault(channel[0], {"index": channel[0], "function": {}})
                call["function"][channel[1]] = rest
        self._first_deltas(delta, calls)
        finish = choice.get("finish_reason")
        if finish and not self._covered():
            raise Diverged  # the new answer ended before it covered the delivered one
        if self.finished:
            finish = None  # the caller has it already
        if not new and not calls and not finish:
            return b""
        if self.finished:
            raise Diverged  # a tool call the answer the caller saw end did not have
        if calls:
            new["tool_calls"] = [calls[index] for index in sorted(calls)]
        return orjson.dumps({**obj, "choices": [{**choice, "delta": new}]})

    def _first_deltas(self, delta: dict[str, Any], calls: dict[int, dict[str, Any]]) -> None:
        """A tool call the caller has not seen begin gets its id and type passed on."""
        for call in delta.get("tool_calls") or ():
            index = call.get("index", 0) if isinstance(call, dict) else None
            if isinstance(index, int) and index not in self.started:
                entry = calls.setdefault(index, {"index": index, "function": {}})
                entry.update({k: v for k, v in call.items() if k in ("id", "type")})
                self.started.add(index)
