"""The built-in mock's answers to Anthropic Messages requests (operation `messages`).

Deterministic, shaped like the API's: a `message` (a `tool_use` block when the request offers
tools and its last message is not a tool result, else a text block), or that message as the
events of a stream, in the adapter's form: `message_start`, per block
`content_block_start` / `_delta`... / `_stop`, then `message_delta` with the stop reason and
usage; `message_stop` is not a chunk (the stream's clean end is).
"""

from __future__ import annotations

from typing import Any

import orjson

from sidecar.upstreams.anthropic import error_type
from sidecar.upstreams.base import Chunk, Usage


def _block_texts(content: Any, *, nested: bool = False) -> list[str]:
    """The texts of `content`: a string, or the string `text`s of a list of blocks, with
    those of a `tool_result` block's own content (one level deep)."""
    if isinstance(content, str):
        return [content] if content else []
    if not isinstance(content, list):
        return []
    texts = []
    for block in content:
        if not isinstance(block, dict):
            continue
        text = block.get("text")
        if isinstance(text, str) and text:
            texts.append(text)
        if block.get("type") == "tool_result" and not nested:
            texts += _block_texts(block.get("content"), nested=True)
    return texts


def _text(content: Any) -> str:
    return " ".join(_block_texts(content))


def _words(text: str) -> int:
    return len(text.split())


def _is_tool_result(message: Any) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    )


def _tool_name(tools: Any) -> str | None:
    """The first offered tool's name (`tool` when it has none); None when none is offered."""
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    name = tools[0].get("name")
    return name if isinstance(name, str) and name else "tool"


def _content(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """The answer's content blocks and stop reason."""
    messages = body["messages"]
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    text = _text(last.get("content"))[:200]
    name = _tool_name(body.get("tools"))
    if _is_tool_result(last):
        return [{"type": "text", "text": f"Based on the tool: {text}"}], "end_turn"
    if name is not None:
        call = {"type": "tool_use", "id": f"toolu_mock_{len(messages)}", "name": name,
                "input": {"query": text}}  # fmt: skip
        return [call], "tool_use"
    return [{"type": "text", "text": f"Mock answer to: {text}"}], "end_turn"


def message(body: dict[str, Any], hit: int) -> tuple[dict[str, Any], Usage]:
    """The whole answer and its usage (words stand for tokens)."""
    content, stop = _content(body)
    prompt = _words(_text(body.get("system"))) + sum(
        _words(_text(m.get("content"))) for m in body["messages"] if isinstance(m, dict)
    )
    output = sum(_words(block.get("text", "")) for block in content) or 1
    answer = {
        "id": f"msg_mock_{hit}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "mock-model"),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt, "output_tokens": output},
        "hit": hit,
    }
    return answer, Usage(prompt, output)


def _deltas(block: dict[str, Any], parts: int) -> list[dict[str, Any]]:
    if block["type"] == "tool_use":
        return [{"type": "input_json_delta", "partial_json": orjson.dumps(block["input"]).decode()}]
    words = block["text"].split(" ")
    step = max(1, -(-len(words) // parts))
    pieces = [" ".join(words[i : i + step]) for i in range(0, len(words), step)]
    return [{"type": "text_delta", "text": piece + (" " if i < len(pieces) - 1 else "")}
            for i, piece in enumerate(pieces)]  # fmt: skip


def events(body: dict[str, Any], hit: int, parts: int) -> list[Chunk]:
    """The answer as stream events (text in `parts` pieces); usage on the first and last."""
    answer, usage = message(body, hit)
    start = {**answer, "content": [], "stop_reason": None,
             "usage": {"input_tokens": usage.input_tokens, "output_tokens": 1}}  # fmt: skip
    out = [Chunk(orjson.dumps({"type": "message_start", "message": start}),
                 Usage(usage.input_tokens, 1))]  # fmt: skip
    for index, block in enumerate(answer["content"]):
        empty = {**block, "input": {}} if block["type"] == "tool_use" else {**block, "text": ""}
        frames = [{"type": "content_block_start", "index": index, "content_block": empty}]
        frames += [{"type": "content_block_delta", "index": index, "delta": delta}
                   for delta in _deltas(block, parts)]  # fmt: skip
        frames.append({"type": "content_block_stop", "index": index})
        out += [Chunk(orjson.dumps(frame)) for frame in frames]
    final = {"type": "message_delta", "delta": {"stop_reason": answer["stop_reason"],
             "stop_sequence": None}, "usage": {"output_tokens": usage.output_tokens}}  # fmt: skip
    out.append(Chunk(orjson.dumps(final), usage))
    return out


def error_body(status: int) -> bytes:
    """Anthropic's error JSON for an injected failure of `status`."""
    error = {"type": error_type(status), "message": f"mock failure {status}"}
    return orjson.dumps({"type": "error", "error": error})
