"""A fake OpenAI-compatible provider on loopback that misbehaves per model name.

It behaves like the real API in the ways a gateway depends on: a model it does not serve is
a 404 `model_not_found`; the answer names the model that answered (as a dated snapshot, the
way OpenAI names `gpt-4o-mini-2024-07-18`); a stream starts with the role, ends its choice
with `finish_reason`, sends the usage chunk (`choices: []`) only when
`stream_options.include_usage` asked for it (with `"usage": null` on every other chunk), then
`data: [DONE]`; errors have OpenAI's `{"error": {message, type, param, code}}` shape; a prompt
longer than the model's context window is a 400 `context_length_exceeded`.

Each model has a queue of faults, one taken per request (then it answers normally):

- `429` (with `Retry-After: retry_after_s` when set), `500`, `503`: that status;
- `reset`: the connection is aborted before any answer; `silent`: headers never come;
- `slow_first`: the first token comes after `delay_s`;
- `cut`: `cut_after` content chunks, then the connection is aborted;
- `stall`: `cut_after` content chunks, then silence;
- `malformed`: `cut_after` content chunks, then an event that is not JSON;
- `error_event`: `cut_after` content chunks, then an in-band `{"error": ...}` event;
- `no_done`: the whole answer, then the body ends without `data: [DONE]`;
- `policy`: a 400 `content_policy_violation`;
- `refuse_prefill`: a 400 when the last message is the assistant's (a prefill).

A request whose last message is the assistant's (a prefill) is answered with the rest of the
answer after it, as a model continuing its own words would.

Every request is logged (`Attempt`: time, model, prompt size, whether it streamed, the fault).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
from aiohttp import web

from tests.integration.support import serve_app

SNAPSHOT = "-2026-01-01"  # what the answer's `model` adds to the model asked for
HI = [{"role": "user", "content": "hi"}]
# short backoffs, and a budget minimum for the retries of single calls
FAST_RETRY = {"max_attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.05,
              "budget_min_retries": 100}  # fmt: skip
POLICY_MESSAGE = "Your request was rejected as a result of our safety system."


def answer_text(prompt: str) -> str:
    """The deterministic answer of every model to a prompt (so a replay can be checked)."""
    return f"You said {len(prompt)} characters; the answer is forty-two."


def tokens(text: str) -> list[str]:
    """The answer's content chunks: each word with the space before it."""
    words = text.split(" ")
    return [words[0], *(" " + word for word in words[1:])]


@dataclass
class Attempt:
    """One request as the provider saw it."""

    at: float
    model: str
    prompt_chars: int
    stream: bool
    fault: str
    body: dict[str, Any]


@dataclass
class Model:
    """A model the provider serves; set its attributes from the test."""

    faults: deque[str] = field(default_factory=deque)
    context_chars: int = 100_000  # longer prompts: context_length_exceeded
    retry_after_s: float | None = None
    delay_s: float = 0.0
    cut_after: int = 2
    text: str | None = None  # the answer, instead of `answer_text`'s
    choices: int = 1  # streamed choices (as `n` asks)
    down_until: float = 0.0  # until this time.monotonic(), every request is a 503
    chunk_gap_s: float = 0.0  # the pause before each streamed content chunk

    def down_for(self, seconds: float) -> Model:
        self.down_until = time.monotonic() + seconds
        return self

    def fail(self, *faults: str) -> Model:
        self.faults.extend(faults)
        return self


def _error(status: int, message: str, kind: str, code: str | None,
           headers: dict[str, str] | None = None) -> web.Response:  # fmt: skip
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), headers=headers,
                        content_type="application/json")  # fmt: skip


def _prompt(body: dict[str, Any]) -> str:
    """The text of every message but the assistant's prefill, if any."""
    parts = []
    for message in _messages(body)[: -1 if prefill_of(body) is not None else None]:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
    return "\n".join(parts)


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    return messages if isinstance(messages, list) else []


def prefill_of(body: dict[str, Any]) -> str | None:
    """The start of the answer a request puts in the assistant's mouth, if it does (the fake
    Messages API reads it the same way)."""
    messages = _messages(body)
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        content = last.get("content")
        return content if isinstance(content, str) else ""
    return None


def continuing(text: str, prefill: str | None) -> str:
    """What a model answers after `prefill`: the rest of `text`, as a model continuing its
    own words would (`text` whole without a prefill)."""
    if prefill is None:
        return text
    return text[len(prefill) :] if text.startswith(prefill) else " and so on."


@dataclass
class Provider:
    """The server: `model(name)` adds or returns a served model; `attempts` logs requests."""

    models: dict[str, Model] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    cancelled: int = 0  # requests whose caller went away before the answer was done
    port: int = 0
    runner: web.AppRunner | None = None

    def model(self, name: str) -> Model:
        return self.models.setdefault(name, Model())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def tried(self, model: str | None = None) -> list[Attempt]:
        return [a for a in self.attempts if model is None or a.model == model]

    def models_tried(self) -> list[str]:
        return [a.model for a in self.attempts]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._chat(request)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        name, stream = body.get("model"), body.get("stream") is True
        served = self.models.get(name) if isinstance(name, str) else None
        prompt = _prompt(body)
        fault = served.faults.popleft() if served and served.faults else ""
        if served is not None and not fault and time.monotonic() < served.down_until:
            fault = "503"
        self.attempts.append(Attempt(time.monotonic(), str(name), len(prompt), stream, fault,
                                     body))  # fmt: skip
        if served is None:
            return _error(404, f"The model `{name}` does not exist or you do not have access "
                          "to it.", "invalid_request_error", "model_not_found")  # fmt: skip
        refused = await self._refusal(request, served, fault, body, prompt)
        if refused is not None:
            return refused
        text = continuing(served.text or answer_text(prompt), prefill_of(body))
        usage = {"prompt_tokens": len(prompt) // 4 + 1, "completion_tokens": len(tokens(text))}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if not stream:
            if fault == "slow_first":
                await asyncio.sleep(served.delay_s)
            return web.json_response(self._completion(name, text, usage), dumps=_dumps)
        return await self._stream(request, served, fault, name, text, usage, body)

    async def _refusal(self, request: web.Request, served: Model, fault: str,
                       body: dict[str, Any], prompt: str) -> web.Response | None:  # fmt: skip
        if fault in ("429", "500", "503"):
            status = int(fault)
            headers = {}
            if status == 429 and served.retry_after_s is not None:
                headers["Retry-After"] = f"{served.retry_after_s:g}"
            kind = "requests" if status == 429 else "server_error"
            return _error(status, f"injected {status}", kind, None, headers)
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(3600)
        if fault == "silent":
            await asyncio.sleep(3600)
        if fault == "policy":
            return _error(400, POLICY_MESSAGE, "invalid_request_error", "content_policy_violation")
        if fault == "refuse_prefill" and prefill_of(body) is not None:
            return _error(400, "assistant prefill is not supported", "invalid_request_error", None)
        if len(prompt) > served.context_chars:
            return _error(400, f"This model's maximum context length is {served.context_chars} "
                          "tokens. However, your messages resulted in more tokens.",
                          "invalid_request_error", "context_length_exceeded")  # fmt: skip
        return None

    @staticmethod
    def _completion(model: str, text: str, usage: dict[str, int]) -> dict[str, Any]:
        message = {"role": "assistant", "content": text, "refusal": None}
        return {"id": "chatcmpl-p", "object": "chat.completion", "created": 1,
                "model": model + SNAPSHOT, "usage": usage,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop",
                             "logprobs": None}]}  # fmt: skip

    async def _stream(self, request: web.Request, served: Model, fault: str, model: str,
                      text: str, usage: dict[str, int],
                      body: dict[str, Any]) -> web.StreamResponse:  # fmt: skip
        options = body.get("stream_options") or {}
        with_usage = options.get("include_usage") is True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choices = [{"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
                       for i in range(served.choices)]  # fmt: skip
            obj: dict[str, Any] = {"id": "chatcmpl-p", "object": "chat.completion.chunk",
                                   "created": 1, "model": model + SNAPSHOT,
                                   "choices": choices}  # fmt: skip
            if with_usage:
                obj["usage"] = None
            return b"data: " + orjson.dumps(obj) + b"\n\n"

        if fault == "slow_first":
            await asyncio.sleep(served.delay_s)
        await resp.write(chunk({"role": "assistant", "content": ""}))
        parts = tokens(text)
        broken = fault in ("cut", "stall", "malformed", "error_event")
        for part in parts[: served.cut_after] if broken else parts:
            if served.chunk_gap_s:
                await asyncio.sleep(served.chunk_gap_s)
            await resp.write(chunk({"content": part}))
        if broken:
            await self._break(request, resp, fault)
            return resp
        await resp.write(chunk({}, "stop"))
        if with_usage:
            last = {"id": "chatcmpl-p", "object": "chat.completion.chunk", "created": 1,
                    "model": model + SNAPSHOT, "choices": [], "usage": usage}  # fmt: skip
            await resp.write(b"data: " + orjson.dumps(last) + b"\n\n")
        if fault != "no_done":
            await resp.write(b"data: [DONE]\n\n")
        return resp

    @staticmethod
    async def _break(request: web.Request, resp: web.StreamResponse, fault: str) -> None:
        if fault == "malformed":
            await resp.write(b"data: {not json\n\n")
        elif fault == "error_event":
            error = {"message": "The server had an error while processing your request.",
                     "type": "server_error", "param": None, "code": None}  # fmt: skip
            await resp.write(b"data: " + orjson.dumps({"error": error}) + b"\n\n")
        if fault in ("malformed", "error_event"):
            await asyncio.sleep(3600)  # the sidecar must end it, not the provider
        await asyncio.sleep(0.05)  # let the chunks leave before the cut
        if fault == "cut":
            assert request.transport is not None
            request.transport.abort()
        await asyncio.sleep(3600)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        self.runner, self.port = await serve_app(app)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def openai_client(http_url: str | None) -> openai.OpenAI:
    """The official client on a sidecar's HTTP front, without its own retries."""
    assert http_url is not None
    return openai.OpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0)
