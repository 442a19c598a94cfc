"""The built-in upstream: deterministic answers and injected faults, without a network.

Model calls get an OpenAI-shaped answer (chat, streamed chat, embeddings), or an
Anthropic-shaped one for operation `messages` (`_mock_anthropic`); tool calls get an echo of
their payload. Every answer carries `"hit": n`, the mock's own sequence number, so a
replayed answer can be told from a fresh one. Faults are drawn from a seeded generator (plus
`fail_first` hits and an optional timed `outage`), so a given config fails on the same hits
every run:

- `status`: an OpenAI-style (for `messages`, Anthropic-style) error body with
  `failure_status` (4xx or 5xx);
- `hang`: never answers (until the caller's timeout cancels it);
- `reset`: the connection drops (mid-stream for streams, after half the chunks);
- `garbage`: a body that is not JSON (mid-stream for streams).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from sidecar.config import MockUpstreamConfig
from sidecar.errors import InvalidRequestError, UpstreamBadResponseError, UpstreamUnavailableError
from sidecar.upstreams import _mock_anthropic as messages
from sidecar.upstreams._aiohttp import raise_for_status
from sidecar.upstreams._checks import check_anthropic_messages, check_messages, wants_usage
from sidecar.upstreams.base import Chunk, UpstreamRequest, UpstreamResponse, Usage

CREATED = 1_700_000_000  # a fixed timestamp keeps answers byte-for-byte deterministic
MODEL_OPERATIONS = ("chat", "", "embeddings", "messages")


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the string `text`s of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = (part.get("text") for part in content if isinstance(part, dict))
        return " ".join(text for text in texts if isinstance(text, str))
    return ""


def _message_text(message: Any) -> str:
    return _text_of(message.get("content")) if isinstance(message, dict) else ""


def _count_tokens(text: str) -> int:
    return max(1, len(text.split())) if text else 0


def _last_message(messages: list[Any]) -> dict[str, Any]:
    return messages[-1] if messages and isinstance(messages[-1], dict) else {}


def _first_tool_name(tools: Any) -> str | None:
    """The name of the first tool offered (`tool` when it has none); None when none offered."""
    if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
        return None
    function = tools[0].get("function")
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name else "tool"


def _check_tools(tools: Any) -> None:
    """InvalidRequestError unless `tools` is absent or a list of objects whose `function`
    (when present) is an object."""
    if tools is None:
        return
    if not isinstance(tools, list):
        raise InvalidRequestError("payload.tools must be a list of tools", field="payload.tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or (function is not None and not isinstance(function, dict)):
            raise InvalidRequestError(
                f"payload.tools[{i}] must be a JSON object whose function is an object",
                field="payload.tools",
            )


class MockUpstream:
    """A deterministic in-process upstream with a hit counter and configurable faults."""

    type = "mock"

    def __init__(self, name: str, config: MockUpstreamConfig) -> None:
        self.name = name
        self.kind = config.kind
        self.timeout_s = config.timeout_s
        self.supports_stream = config.kind == "model"
        self._config = config
        self._latency_s = config.latency_ms / 1000.0
        self._rng = random.Random(config.seed)
        self._outage_started: float | None = None
        self.hits = 0

    async def start(self) -> None:
        """Nothing to open: the mock has no connections."""

    async def close(self) -> None:
        """Nothing to release."""

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits}

    def validate(self, request: UpstreamRequest) -> None:
        if self.kind != "model":
            return
        if request.operation not in MODEL_OPERATIONS:
            raise InvalidRequestError(
                f"upstream {self.name!r} has no operation {request.operation!r}; "
                "expected chat, embeddings or messages",
                field="operation",
            )
        if not isinstance(request.body, dict):
            raise InvalidRequestError("a model payload must be a JSON object", field="payload")
        if request.operation == "messages":
            check_anthropic_messages(request.body)
        if request.operation != "embeddings":
            check_messages(request.body.get("messages"))
            _check_tools(request.body.get("tools"))

    def _next_hit(self) -> tuple[int, bool]:
        self.hits += 1
        rate = self._config.failure_rate
        drawn = rate > 0 and self._rng.random() < rate
        return self.hits, drawn or self.hits <= self._config.fail_first or self._in_outage()

    def _in_outage(self) -> bool:
        outage = self._config.outage
        if outage is None or self.hits <= outage.after_hits:
            return False
        now = time.monotonic()
        if self._outage_started is None:
            self._outage_started = now
        return now - self._outage_started < outage.duration_s

    async def _fail_before_answer(self, operation: str) -> None:
        kind = self._config.failure_kind
        if kind == "hang":
            await asyncio.Event().wait()
        if kind == "reset":
            raise UpstreamUnavailableError(
                f"upstream {self.name!r}: connection failed: connection reset by peer",
                upstream=self.name,
            )
        if kind == "status":
            status = self._config.failure_status
            error = {"message": f"mock failure {status}", "type": "mock"}
            body = (
                messages.error_body(status)
                if operation == "messages"
                else orjson.dumps({"error": error})
            )
            raise_for_status(status, body, {}, upstream=self.name, secrets=())

    def _garbage(self) -> UpstreamBadResponseError:
        return UpstreamBadResponseError(
            f"upstream {self.name!r} answered a body that is not JSON", upstream=self.name
        )

    async def call(self, request: UpstreamRequest) -> UpstreamResponse:
        hit, fail = self._next_hit()
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        if fail:
            await self._fail_before_answer(request.operation)
            raise self._garbage()
        if self.kind == "tool":
            answer = {"tool": request.operation, "echo": request.body, "hit": hit}
            return UpstreamResponse(orjson.dumps(answer))
        if request.operation == "embeddings":
            return self._embeddings(request.body, hit)
        if request.operation == "messages":
            answer, usage = messages.message(request.body, hit)
            return UpstreamResponse(orjson.dumps(answer), usage=usage, body=answer)
        answer, usage = self._chat(request.body, hit)
        return UpstreamResponse(orjson.dumps(answer), usage=usage, body=answer)

    def _embeddings(self, body: dict[str, Any], hit: int) -> UpstreamResponse:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for i, item in enumerate(items):
            seed = sum(str(item).encode()) % 997
            data.append({"object": "embedding", "index": i, "embedding": [seed / 997, i / 8, 0.5]})
        tokens = sum(_count_tokens(str(item)) for item in items)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        answer = {"object": "list", "data": data, "model": body.get("model", "mock-embed")}
        answer.update(usage=usage, hit=hit)
        return UpstreamResponse(orjson.dumps(answer), usage=Usage(tokens, 0), body=answer)

    def _reply(self, body: dict[str, Any]) -> tuple[dict[str, Any], str]:
        messages = body["messages"]
        last = _last_message(messages)
        text = _message_text(last)
        name = _first_tool_name(body.get("tools"))
        if name is not None and last.get("role") != "tool":
            call = {
                "id": f"call_{len(messages)}",
                "type": "function",
                "function": {"name": name, "arguments": orjson.dumps({"query": text}).decode()},
            }
            return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
        if last.get("role") == "tool":
            return {"role": "assistant", "content": f"Based on the tool: {text[:200]}"}, "stop"
        return {"role": "assistant", "content": f"Mock answer to: {text[:200]}"}, "stop"

    def _chat(self, body: dict[str, Any], hit: int) -> tuple[dict[str, Any], Usage]:
        message, finish = self._reply(body)
        prompt = sum(_count_tokens(_message_text(m)) for m in body["messages"])
        usage = Usage(prompt, _count_tokens(message.get("content") or "") or 1)
        answer = {
            "id": f"chatcmpl-mock-{hit}",
            "object": "chat.completion",
            "created": CREATED,
            "model": body.get("model", "mock-model"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": usage.input_tokens,
                "completion_tokens": usage.output_tokens,
                "total_tokens": usage.total_tokens,
            },
            "hit": hit,
        }
        return answer, usage

    async def stream(self, request: UpstreamRequest) -> AsyncIterator[Chunk]:
        hit, fail = self._next_hit()
        if self._latency_s:
            await asyncio.sleep(self._latency_s)
        if fail and self._config.failure_kind in ("hang", "status"):
            await self._fail_before_answer(request.operation)
        chunks = self._stream_chunks(request, hit)
        cut = len(chunks) // 2 if fail else len(chunks)
        for chunk in chunks[:cut]:
            yield chunk
            await asyncio.sleep(0)
        if fail:
            if self._config.failure_kind == "reset":
                await self._fail_before_answer(request.operation)
            raise self._garbage()

    def _stream_chunks(self, request: UpstreamRequest, hit: int) -> list[Chunk]:
        """The whole streamed answer; usage on its last chunk (which carries no data unless
        the caller asked for `stream_options.include_usage`)."""
        if request.operation == "messages":
            return messages.events(request.body, hit, self._config.stream_chunks)
        answer, usage = self._chat(request.body, hit)
        chunks = [Chunk(data) for data in self._chunks(answer, hit)]
        # the usage chunk only when the caller asked for it, as the openai adapter does
        asked = wants_usage(request.body)
        usage_data = orjson.dumps(self._usage_chunk(answer, hit)) if asked else b""
        chunks.append(Chunk(usage_data, usage=usage))
        return chunks

    def _chunk(self, answer: dict[str, Any], hit: int, delta: dict[str, Any], finish: Any) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return orjson.dumps(
            {
                "id": answer["id"],
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": answer["model"],
                "choices": [choice],
                "hit": hit,
            }
        )

    def _chunks(self, answer: dict[str, Any], hit: int) -> list[bytes]:
        message = answer["choices"][0]["message"]
        finish = answer["choices"][0]["finish_reason"]
        out = [self._chunk(answer, hit, {"role": "assistant", "content": ""}, None)]
        if message.get("tool_calls"):
            calls = [dict(c, index=i) for i, c in enumerate(message["tool_calls"])]
            out.append(self._chunk(answer, hit, {"tool_calls": calls}, None))
        else:
            words = (message.get("content") or "").split(" ")
            parts = self._config.stream_chunks
            step = max(1, -(-len(words) // parts))
            for i in range(0, len(words), step):
                piece = " ".join(words[i : i + step]) + (" " if i + step < len(words) else "")
                out.append(self._chunk(answer, hit, {"content": piece}, None))
        out.append(self._chunk(answer, hit, {}, finish))
        return out

    def _usage_chunk(self, answer: dict[str, Any], hit: int) -> dict[str, Any]:
        return {
            "id": answer["id"],
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": answer["model"],
            "choices": [],
            "usage": answer["usage"],
            "hit": hit,
        }
