"""`wrap_openai` / `wrap_anthropic`: base URL and per-request headers, seen by an in-memory
HTTP transport of the same httpx package the client uses (the HTTP front has its own tests)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import anthropic
import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import tether
from tether import _instrument

HI = [{"role": "user", "content": "hi"}]
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
           "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
           "usage": {"input_tokens": 3, "output_tokens": 1}}  # fmt: skip
CHAT = {"id": "c1", "object": "chat.completion", "created": 0, "model": "gpt-x",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "hello"}}]}  # fmt: skip


@pytest.fixture(autouse=True)
def _traced() -> Iterator[None]:
    """Spans are made (so a traceparent exists), and forgotten after the test."""
    tether.instrument("wrap-test", exporter=InMemorySpanExporter())
    yield
    _instrument._reset_for_tests()


def http_library(sdk: ModuleType) -> Any:
    """The httpx package (httpx or httpx2) the SDK's default client is made of."""
    base = next(c for c in sdk.DefaultHttpxClient.__mro__ if c.__name__ == "Client")
    return importlib.import_module(base.__module__.split(".")[0])


class Recorder:
    """An in-memory transport answering `answers` in turn (then the last one again)."""

    def __init__(self, sdk: ModuleType, *answers: tuple[int, dict[str, Any]]) -> None:
        self.http = http_library(sdk)
        self.requests: list[Any] = []
        self._answers = list(answers)

    def handle(self, request: Any) -> Any:
        self.requests.append(request)
        status, body = self._answers.pop(0) if len(self._answers) > 1 else self._answers[0]
        return self.http.Response(status, json=body, headers={"retry-after-ms": "1"})

    async def ahandle(self, request: Any) -> Any:
        return self.handle(request)

    def client(self) -> Any:
        return self.http.Client(transport=self.http.MockTransport(self.handle))

    def async_client(self) -> Any:
        return self.http.AsyncClient(transport=self.http.MockTransport(self.ahandle))

    def header(self, name: str) -> list[str | None]:
        return [r.headers.get(name) for r in self.requests]


def test_wrap_anthropic_sets_the_root_url_and_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Anthropic client is pointed at the front's root ($TETHER_HTTP_URL minus /v1) and
    each request carries run, step key, traceparent and the sidecar's token, not the API key."""
    monkeypatch.setenv("TETHER_HTTP_URL", "http://127.0.0.1:7999/v1")
    monkeypatch.setenv("TETHER_TOKEN", "tok")
    seen = Recorder(anthropic, (200, MESSAGE))
    client = anthropic.Anthropic(api_key="sk-ant-secret", http_client=seen.client())
    assert tether.wrap_anthropic(client) is client and client.max_retries == 0
    with tether.agent("claude-agent", run_id="a-1"):
        for _ in range(2):
            answer = client.messages.create(model="claude-x", max_tokens=5, messages=HI)
            assert answer.content[0].text == "hello"
    assert [str(r.url) for r in seen.requests] == ["http://127.0.0.1:7999/v1/messages"] * 2
    assert seen.header("x-tether-run-id") == ["a-1", "a-1"]
    assert seen.header("idempotency-key") == ["a-1:1", "a-1:2"]
    assert seen.header("authorization") == ["Bearer tok"] * 2
    assert seen.header("x-api-key") == [None, None]
    assert all((tp or "").startswith("00-") for tp in seen.header("traceparent"))


def test_client_retries_keep_the_key() -> None:
    """When the client's own retries are kept, a retried request keeps its call's key, and
    the next call takes the next step."""
    seen = Recorder(anthropic, (529, {"type": "error", "error": {"type": "overloaded_error",
                                                                 "message": "busy"}}),
                    (200, MESSAGE))  # fmt: skip
    client = tether.wrap_anthropic(
        anthropic.Anthropic(api_key="k", http_client=seen.client()),
        url="http://127.0.0.1:7999", max_retries=2,
    )  # fmt: skip
    assert str(client.base_url) == "http://127.0.0.1:7999"
    with tether.run(run_id="retry-1"):
        for _ in range(2):
            client.messages.create(model="claude-x", max_tokens=5, messages=HI)
    assert seen.header("x-stainless-retry-count") == ["0", "1", "0"]
    assert seen.header("idempotency-key") == ["retry-1:1", "retry-1:1", "retry-1:2"]


async def test_wrap_async_openai_outside_a_run() -> None:
    """An AsyncOpenAI client gets an async hook; outside a run no journal headers are sent
    (the front would not journal them), and without a token the API key is not sent."""
    seen = Recorder(openai, (200, CHAT))
    client = openai.AsyncOpenAI(api_key="sk-secret", http_client=seen.async_client())
    tether.wrap_openai(client, url="http://127.0.0.1:7998/v1")
    tether.wrap_openai(client, url="http://127.0.0.1:7998/v1")  # again: still one hook
    answer = await client.chat.completions.create(model="gpt-x", messages=[])
    assert answer.choices[0].message.content == "hello"
    assert [str(r.url) for r in seen.requests] == ["http://127.0.0.1:7998/v1/chat/completions"]
    assert seen.header("x-tether-run-id") == [None] and seen.header("authorization") == [None]
    assert len(client._client.event_hooks["request"]) == 1


def test_get_requests_take_no_step() -> None:
    """Listing models (GET) carries the run but takes no step of it: only calls that the
    front journals do."""
    seen = Recorder(openai, (200, {"object": "list", "data": []}), (200, CHAT))
    client = tether.wrap_openai(openai.OpenAI(api_key="k", http_client=seen.client()))
    assert str(client.base_url) == "http://127.0.0.1:7701/v1/"
    with tether.run(run_id="g-1"):
        list(client.models.list())
        client.chat.completions.create(model="gpt-x", messages=[])
    assert seen.header("idempotency-key") == [None, "g-1:1"]


@pytest.mark.parametrize("wrap", [tether.wrap_openai, tether.wrap_anthropic])
def test_wrapping_something_else_is_a_type_error(wrap: Callable[..., Any]) -> None:
    """A wrap of an object without the clients' shape says what it expected."""
    with pytest.raises(TypeError, match=r"expected an? (openai|anthropic)"):
        wrap(object())
