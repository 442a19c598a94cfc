"""Mid-stream recovery for Anthropic's Messages events (see `sidecar.recovery.base`).

Channels: each content block by its index, its type (a tool_use block's name too) and the
text its deltas carry (`text`, `partial_json`, `thinking`, `signature`). The new stream's
`message_start` is never passed on (the caller has one); blocks the caller has seen begin
are not begun again; indices continue the delivered answer's. A prefill is the delivered
text (text blocks only) without trailing white space, which the API refuses in a prefill;
the white space taken off is taken off the continuation's start in turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.recovery.base import Continuation, Diverged, HeldReplay, overlap, prefilled
from sidecar.upstreams.base import UpstreamRequest

DELTA_TEXT = {"text_delta": "text", "input_json_delta": "partial_json",
              "thinking_delta": "thinking", "signature_delta": "signature"}  # fmt: skip


@dataclass(slots=True)
class Block:
    """A content block as the caller has it."""

    kind: str  # text, tool_use, thinking...
    name: str  # a tool_use block's tool
    parts: list[str] = field(default_factory=list)  # its deltas' text, joined when needed
    stopped: bool = False
    others: int = 0  # deltas of other types (citations...), passed on as they are

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def frozen(self) -> Block:
        """A copy with the text as it is now."""
        return Block(self.kind, self.name, [self.text], self.stopped, self.others)


def _event(data: bytes) -> dict[str, Any]:
    obj = orjson.loads(data)
    if not isinstance(obj, dict):
        raise Diverged
    return obj


def _is_text(obj: dict[str, Any]) -> bool:
    """Whether a content_block_delta carries text of a type recovery compares."""
    delta = obj.get("delta")
    return isinstance(delta, dict) and delta.get("type") in DELTA_TEXT


def _delta_text(obj: dict[str, Any]) -> str:
    delta = obj.get("delta")
    if not isinstance(delta, dict):
        return ""
    text = delta.get(DELTA_TEXT.get(delta.get("type", ""), ""), "")
    return text if isinstance(text, str) else ""


def _with_text(obj: dict[str, Any], index: int, text: str) -> bytes:
    delta = obj.get("delta")
    assert isinstance(delta, dict)
    key = DELTA_TEXT[delta["type"]]
    return orjson.dumps({**obj, "index": index, "delta": {**delta, key: text}})


def _common(one: str, other: str) -> int:
    """How many characters the two strings begin with alike."""
    same = 0
    for a, b in zip(one, other, strict=False):
        if a != b:
            break
        same += 1
    return same


def _reindexed(obj: dict[str, Any], index: int) -> bytes:
    return orjson.dumps({**obj, "index": index})


def _started(obj: dict[str, Any]) -> Block:
    block = obj.get("content_block")
    block = block if isinstance(block, dict) else {}
    name = block.get("name")
    return Block(str(block.get("type", "")), name if isinstance(name, str) else "")


class AnthropicAnswer:
    """What the caller has received of a Messages stream, block by block."""

    refusal = None  # every Messages stream can be tried

    def __init__(self) -> None:
        self.blocks: dict[int, Block] = {}
        self.ended = False  # the caller has the message_delta that ends the message

    @property
    def complete(self) -> bool:
        """The caller has the whole message (its message_delta): nothing to recover."""
        return self.ended

    def feed(self, data: bytes) -> None:
        try:
            obj = _event(data)
        except (orjson.JSONDecodeError, Diverged):
            return
        kind, index = obj.get("type"), obj.get("index")
        if kind == "message_delta":
            self.ended = True
        if not isinstance(index, int):
            return
        if kind == "content_block_start":
            self.blocks[index] = _started(obj)
        elif kind == "content_block_delta" and index in self.blocks:
            if _is_text(obj):
                self.blocks[index].parts.append(_delta_text(obj))
            else:
                self.blocks[index].others += 1
        elif kind == "content_block_stop" and index in self.blocks:
            self.blocks[index].stopped = True

    def prefill(
        self, request: UpstreamRequest, params: dict[str, Any]
    ) -> tuple[UpstreamRequest, Continuation] | None:
        blocks = [self.blocks[i] for i in sorted(self.blocks)]
        text = "".join(block.text for block in blocks)
        if not blocks or any(b.kind != "text" for b in blocks) or not text.strip() or self.ended:
            return None
        made = prefilled(request, params, text, rstrip=True)  # the API refuses trailing space
        if made is None:
            return None
        prefill_request, space = made
        last = max(self.blocks)
        continued = not self.blocks[last].stopped
        base = last if continued else last + 1
        return prefill_request, _Prefilled(base, continued, space)

    def replay(self) -> Continuation:
        return _Replayed({i: block.frozen() for i, block in self.blocks.items()}, self.ended)


class _Prefilled:
    """The continuation's blocks numbered on from the delivered ones: its first block goes
    on with the delivered block that was cut (when it was), without the white space the
    prefill left out."""

    def __init__(self, base: int, continued: bool, space: str) -> None:
        self.base, self.continued, self.space = base, continued, space

    def push(self, data: bytes) -> list[bytes]:
        obj = _event(data)
        kind, index = obj.get("type"), obj.get("index")
        if kind == "message_start":
            return []
        if not isinstance(index, int):
            return [data]
        if kind == "content_block_start" and index == 0 and self.continued:
            if _started(obj).kind != "text":
                raise Diverged  # it does not go on with the text block that was cut
            return []
        if kind == "content_block_delta" and index == 0 and self.space and _is_text(obj):
            text = _delta_text(obj)
            same = _common(self.space, text)
            text, self.space = text[same:], self.space[same:] if same == len(text) else ""
            return [_with_text(obj, self.base, text)] if text else []
        return [_reindexed(obj, self.base + index)]

    def end(self) -> None:
        return None


class _Replayed(HeldReplay):
    """The new message held back until it covers the delivered blocks (each the same kind,
    each delivered text a prefix of the new), then only what is new."""

    def __init__(self, blocks: dict[int, Block], ended: bool) -> None:
        super().__init__()
        self.delivered = blocks
        self.texts = {i: block.text for i, block in blocks.items()}
        self.others: dict[int, int] = {}  # other deltas of each block in the new message
        self.ended = ended  # the caller has the message_delta already
        self.sent: dict[int, int] = {}  # how far each block of the new message is
        self.begun: set[int] = set()

    def _covered(self) -> bool:
        return all(i in self.begun and self.sent.get(i, 0) >= len(text)
                   for i, text in self.texts.items())  # fmt: skip

    def _trim(self, data: bytes) -> bytes:
        obj = _event(data)
        kind, index = obj.get("type"), obj.get("index")
        if kind == "message_start":
            return b""
        if kind == "message_delta" and not self._covered():
            raise Diverged  # the new message ended before covering the delivered one
        if kind == "message_delta" and self.ended:
            return b""
        if not isinstance(index, int) or index not in self.delivered:
            if self.ended and kind != "message_delta":
                raise Diverged  # more than the message the caller has whole
            return data
        block = self.delivered[index]
        if kind == "content_block_start":
            began = _started(obj)
            if (began.kind, began.name) != (block.kind, block.name):
                raise Diverged
            self.begun.add(index)
            return b""
        if kind == "content_block_delta" and not _is_text(obj):
            self.others[index] = self.others.get(index, 0) + 1
            return b"" if self.others[index] <= block.others else data
        if kind == "content_block_delta":
            piece = _delta_text(obj)
            sent = self.sent.get(index, 0)
            rest = overlap(self.texts[index], sent, piece)
            self.sent[index] = sent + len(piece)
            if rest and block.stopped:
                raise Diverged  # the caller saw this block end shorter
            return _with_text(obj, index, rest) if rest else b""
        if kind == "content_block_stop":
            sent, length = self.sent.get(index, 0), len(self.texts[index])
            if sent < length or (block.stopped and sent != length):
                raise Diverged
            return b"" if block.stopped else data
        return data
