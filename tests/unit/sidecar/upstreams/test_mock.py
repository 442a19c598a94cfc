"""The built-in mock upstream: deterministic answers, hit counter, injected faults."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from sidecar import errors
from sidecar.config import MockUpstreamConfig
from sidecar.upstreams.base import Upstream, UpstreamRequest
from sidecar.upstreams.mock import MockUpstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


def mock(**options: Any) -> MockUpstream:
    options.setdefault("kind", "model")
    return MockUpstream("m", MockUpstreamConfig(type="mock", **options))


def request(body: Any, operation: str = "chat") -> UpstreamRequest:
    return UpstreamRequest(operation, orjson.dumps(body), body)


async def test_chat_answer_is_openai_shaped_with_hit() -> None:
    """A chat call answers an OpenAI chat.completion with usage and the hit number."""
    up = mock()
    assert isinstance(up, Upstream)
    answer = await up.call(request(CHAT))
    body = orjson.loads(answer.payload)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "Mock answer to: hello there"
    assert body["hit"] == 1
    assert answer.usage is not None and answer.usage.input_tokens == 2
    assert (await up.call(request(CHAT))).payload != answer.payload
    assert up.stats() == {"hits": 2}


async def test_answers_are_deterministic_across_instances() -> None:
    """Two mocks with the same config give byte-identical answers and faults."""
    a, b = mock(failure_rate=0.5, seed=3), mock(failure_rate=0.5, seed=3)
    outcomes = []
    for up in (a, b):
        seq = []
        for _ in range(20):
            try:
                seq.append((await up.call(request(CHAT))).payload)
            except errors.UpstreamError as exc:
                seq.append(type(exc).__name__.encode())
        outcomes.append(seq)
    assert outcomes[0] == outcomes[1]
    assert 3 < sum(o == b"UpstreamUnavailableError" for o in outcomes[0]) < 17


async def test_tool_echoes_payload() -> None:
    """A tool mock echoes the payload with its operation and hit."""
    up = mock(kind="tool")
    answer = await up.call(request({"q": 1}, operation="search"))
    assert orjson.loads(answer.payload) == {"tool": "search", "echo": {"q": 1}, "hit": 1}


async def test_tools_in_request_give_a_tool_call() -> None:
    """With tools offered, the mock asks for the first tool; after a tool result it answers."""
    tools = [{"type": "function", "function": {"name": "search"}}]
    body = {**CHAT, "tools": tools}
    first = orjson.loads((await mock().call(request(body))).payload)
    call = first["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "search"
    assert first["choices"][0]["finish_reason"] == "tool_calls"
    follow = {**body, "messages": [*CHAT["messages"], {"role": "tool", "content": "Paris"}]}
    second = orjson.loads((await mock().call(request(follow))).payload)
    assert second["choices"][0]["message"]["content"] == "Based on the tool: Paris"


@pytest.mark.parametrize(
    ("status", "error"),
    [(503, errors.UpstreamUnavailableError), (429, errors.UpstreamClientError)],
)
async def test_status_failures(status: int, error: type[Exception]) -> None:
    """failure_kind status raises the error of that HTTP status."""
    with pytest.raises(error) as info:
        await mock(failure_rate=1.0, failure_status=status).call(request(CHAT))
    assert info.value.http_status == status  # type: ignore[attr-defined]


async def test_reset_and_garbage_failures() -> None:
    """reset is an unavailable upstream; garbage is a bad response."""
    with pytest.raises(errors.UpstreamUnavailableError, match="reset"):
        await mock(failure_rate=1.0, failure_kind="reset").call(request(CHAT))
    with pytest.raises(errors.UpstreamBadResponseError):
        await mock(failure_rate=1.0, failure_kind="garbage").call(request(CHAT))


async def test_hang_never_answers() -> None:
    """failure_kind hang waits until the caller gives up."""
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await mock(failure_rate=1.0, failure_kind="hang").call(request(CHAT))


async def test_stream_chunks_rebuild_the_answer() -> None:
    """Streamed chunks concatenate to the unary answer; the last chunk has usage, as a
    usage chunk when the caller asked for one, else with no data."""
    asked = {**CHAT, "stream_options": {"include_usage": True}}
    chunks = [c async for c in mock(stream_chunks=3).stream(request(asked))]
    parsed = [orjson.loads(c.data) for c in chunks]
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in parsed if p["choices"])
    assert text == "Mock answer to: hello there"
    assert parsed[-1]["choices"] == [] and chunks[-1].usage is not None
    assert all(p["hit"] == 1 for p in parsed)
    unasked = [c async for c in mock(stream_chunks=3).stream(request(CHAT))]
    assert unasked[-1].data == b"" and unasked[-1].usage == chunks[-1].usage
    assert [c.data for c in unasked[:-1]] == [c.data for c in chunks[:-1]]


async def test_stream_reset_cuts_midway() -> None:
    """A reset stream yields some chunks, then raises: never a clean end."""
    seen = []
    with pytest.raises(errors.UpstreamUnavailableError):
        async for chunk in mock(failure_rate=1.0, failure_kind="reset").stream(request(CHAT)):
            seen.append(chunk)
    assert seen


async def test_embeddings() -> None:
    """Embeddings answer one vector per input with usage."""
    answer = await mock().call(request({"input": ["a", "b c"]}, operation="embeddings"))
    body = orjson.loads(answer.payload)
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert answer.usage is not None and answer.usage.input_tokens == 3


def test_validate_rejects_bad_model_payloads() -> None:
    """A model payload must be an object with messages, and the operation must exist."""
    up = mock()
    with pytest.raises(errors.InvalidRequestError) as info:
        up.validate(request([1, 2]))
    assert info.value.field == "payload"
    with pytest.raises(errors.InvalidRequestError) as info:
        up.validate(request({"model": "m"}))
    assert info.value.field == "payload.messages"
    with pytest.raises(errors.InvalidRequestError) as info:
        up.validate(request(CHAT, operation="fly"))
    assert info.value.field == "operation"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": ["hi"]}, "payload.messages"),
        ({"messages": [{"role": "user", "content": "x"}, 5]}, "payload.messages"),
        ({**CHAT, "tools": [{"function": "x"}]}, "payload.tools"),
        ({**CHAT, "tools": ["search"]}, "payload.tools"),
        ({**CHAT, "tools": {"function": {"name": "search"}}}, "payload.tools"),
    ],
)
def test_validate_rejects_malformed_chat_shapes(body: dict[str, Any], field: str) -> None:
    """Messages that are not objects and malformed tools are InvalidRequestError on their field."""
    with pytest.raises(errors.InvalidRequestError) as info:
        mock().validate(request(body))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("content", "prompt_tokens"),
    [
        ([{"text": 5}, {"type": "image_url"}, "raw", {"text": "two words"}], 2),
        (5, 0),
        (None, 0),
        ({"text": "an object"}, 0),
    ],
)
async def test_odd_content_types_are_answered(content: Any, prompt_tokens: int) -> None:
    """Content of odd types is answered (unary and streamed), counting only its string texts."""
    body = {"messages": [{"role": "user", "content": content}]}
    up = mock()
    up.validate(request(body))
    answer = await up.call(request(body))
    assert answer.usage is not None and answer.usage.input_tokens == prompt_tokens
    chunks = [c async for c in up.stream(request(body))]
    assert chunks[-1].usage is not None


async def test_tool_without_a_string_name_is_called_tool() -> None:
    """An offered tool whose function has no usable name is called as `tool`."""
    for tool in ({"type": "function"}, {"function": {"name": 5}}, {"function": None}):
        body = {**CHAT, "tools": [tool]}
        mock().validate(request(body))
        answer = orjson.loads((await mock().call(request(body))).payload)
        assert answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "tool"
