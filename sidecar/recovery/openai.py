"""Mid-stream recovery for OpenAI's chat completion chunks (see `sidecar.recovery.base`).

Every string in choice 0's `delta` is a channel, by its path: `content`, `refusal`,
`reasoning_content` or `reasoning` (what reasoning servers stream), `function_call.arguments`,
`audio.transcript`, each tool call's `function.name` and `function.arguments` by its `index`,
and any field added later. Inside a nested object, `id`, `type` and non-string values are
said once, with the object's first delta, and not compared. `role` is never said again. A
replay's chunk that was trimmed loses its `logprobs` (they would repeat delivered tokens).
`n > 1` (several choices) is not recovered: the clear reason is `refusal`.
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.recovery.base import Continuation, Diverged, HeldReplay, overlap, prefilled
from sidecar.upstreams.base import UpstreamRequest

Path = tuple[Any, ...]  # keys, and list items by their `index`
ONCE = ("id", "type")  # said with a nested object's first delta, never compared


def _choice(obj: Any) -> dict[str, Any] | None:
    """Choice 0 of a chunk (None for a chunk without choices, such as the usage chunk);
    Diverged for a chunk of several choices."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if not isinstance(choices, list) or not choices:
        return None
    if len(choices) > 1 or not isinstance(choices[0], dict) or choices[0].get("index", 0):
        raise Diverged
    return choices[0]


def _walk(value: dict[str, Any], path: Path, texts: list[Any], once: list[Any]) -> None:
    """The delta's strings to compare (`texts`) and what nested objects say once, by path."""
    for key, item in value.items():
        here = (*path, key)
        if isinstance(item, dict):
            _walk(item, here, texts, once)
        elif isinstance(item, list):
            for entry in item:
                if isinstance(entry, dict) and isinstance(entry.get("index", 0), int):
                    rest = {k: v for k, v in entry.items() if k != "index"}
                    _walk(rest, (*here, entry.get("index", 0)), texts, once)
        elif not path:
            if isinstance(item, str) and item and key != "role":
                texts.append((here, item))
        elif isinstance(item, str) and key not in ONCE:
            if item:
                texts.append((here, item))
        elif item is not None:
            once.append((here, item))


def _pieces(delta: dict[str, Any]) -> tuple[list[tuple[Path, str]], list[tuple[Path, Any]]]:
    texts: list[tuple[Path, str]] = []
    once: list[tuple[Path, Any]] = []
    _walk(delta, (), texts, once)
    return texts, once


def _build(items: list[tuple[Path, Any]]) -> dict[str, Any]:
    """A delta holding `items` at their paths (list items rebuilt with their `index`)."""
    root: dict[str, Any] = {}
    for path, value in items:
        node, i = root, 0
        while i < len(path) - 1:
            key, following = path[i], path[i + 1]
            if isinstance(following, int):
                entries = node.setdefault(key, [])
                entry = next((e for e in entries if e["index"] == following), None)
                if entry is None:
                    entry = {"index": following}
                    entries.append(entry)
                node, i = entry, i + 2
            else:
                node, i = node.setdefault(key, {}), i + 1
        if i == len(path) - 1:
            node[path[-1]] = value
    return root


class OpenAIAnswer:
    """What the caller has received of a chat completion stream, by channel."""

    def __init__(self) -> None:
        self._parts: dict[Path, list[str]] = {}  # joined only when a recovery needs them
        self.begun: set[Path] = set()  # nested objects whose first delta was sent
        self.finished = False  # the caller has choice 0's finish_reason
        self.usage_sent = False  # ... and the usage chunk
        self._refusal: str | None = None

    @property
    def refusal(self) -> str | None:
        return self._refusal

    @property
    def complete(self) -> bool:
        """The caller has the whole answer (its finish_reason): nothing to recover."""
        return self.finished

    @property
    def channels(self) -> dict[Path, str]:
        """Each channel's text so far."""
        return {path: "".join(parts) for path, parts in self._parts.items()}

    def feed(self, data: bytes) -> None:
        try:
            obj = orjson.loads(data)
            choice = _choice(obj)
        except orjson.JSONDecodeError:
            self._refusal = "a chunk that is not JSON"
            return
        except Diverged:
            self._refusal = "n > 1: an answer of several choices is not recovered"
            return
        if not isinstance(obj, dict):
            self._refusal = "a chunk that is not a chat completion chunk"
            return
        if choice is None:
            self.usage_sent = self.usage_sent or isinstance(obj.get("usage"), dict)
            return
        if choice.get("finish_reason"):
            self.finished = True
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return
        texts, once = _pieces(delta)
        for path, text in texts:
            self._parts.setdefault(path, []).append(text)
        for path, _ in (*texts, *once):
            self.begun.update(path[:end] for end in range(1, len(path)))

    def prefill(
        self, request: UpstreamRequest, params: dict[str, Any]
    ) -> tuple[UpstreamRequest, Continuation] | None:
        text = "".join(self._parts.get(("content",), ()))
        if set(self._parts) != {("content",)} or not text or self.finished:
            return None
        made = prefilled(request, params, text)
        return None if made is None else (made[0], _Prefilled())

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
        opening = isinstance(delta, dict) and not any(_pieces(delta))
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
        self.usage_sent = answer.usage_sent
        self.begun = set(answer.begun)  # nested objects the caller has seen begin
        self.sent: dict[Path, int] = {}  # how far the new answer is, by channel

    def _covered(self) -> bool:
        return all(self.sent.get(c, 0) >= len(text) for c, text in self.delivered.items())

    def _trim(self, data: bytes) -> bytes:
        """The chunk without what the caller already has; b"" when nothing is left."""
        obj = orjson.loads(data)
        choice = _choice(obj)
        if choice is None:
            return b"" if self.usage_sent and isinstance(obj.get("usage"), dict) else data
        delta = choice.get("delta")
        texts, once = _pieces(delta if isinstance(delta, dict) else {})
        kept: list[tuple[Path, Any]] = []
        trimmed = False
        for path, piece in texts:
            sent = self.sent.get(path, 0)
            rest = overlap(self.delivered.get(path, ""), sent, piece)
            self.sent[path] = sent + len(piece)
            if rest and self.finished:
                raise Diverged  # longer than the answer the caller saw end
            trimmed = trimmed or rest != piece
            if rest:
                kept.append((path, rest))
        for path, value in once:
            if path[:-1] not in self.begun:
                kept.append((path, value))
        for path, _ in (*texts, *once):
            self.begun.update(path[:end] for end in range(1, len(path)))
        finish = choice.get("finish_reason")
        if finish and not self._covered():
            raise Diverged  # the new answer ended before it covered the delivered one
        if self.finished:
            finish = None  # the caller has it already
        if not kept and not finish:
            return b""
        if self.finished:
            raise Diverged  # something the answer the caller saw end did not have
        new = {**choice, "delta": _build(kept), "finish_reason": finish}
        if trimmed:
            new["logprobs"] = None
        return orjson.dumps({**obj, "choices": [new]})
