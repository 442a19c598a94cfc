"""The built-in mock's Anthropic Messages answers (operation `messages`), unary and streamed."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar import errors
from sidecar.config import MockUpstreamConfig
from sidecar.upstreams.base import UpstreamRequest, Usage
from sidecar.upstreams.mock import MockUpstream

HELLO = [{"role": "user", "content": "hello there"}]
BODY = {"model": "claude-mock", "max_tokens": 100, "system": "be brief", "messages": HELLO}
TOOLS = [{"name": "search", "input_schema": {"type": "object"}}]


def mock(**options: Any) -> MockUpstream:
    return MockUpstream("m", MockUpstreamConfig(type="mock", kind="model", **options))


def request(body: Any = BODY) -> UpstreamRequest:
    return UpstreamRequest("messages", orjson.dumps(body), body)


async def events(up: MockUpstream, body: Any = BODY) -> list[dict[str, Any]]:
    return [orjson.loads(chunk.data) async for chunk in up.stream(request(body))]


async def test_message_answer() -> None:
    """A unary call answers an Anthropic message: text block, stop reason, usage, hit."""
    up = mock()
    up.validate(request())
    answer = await up.call(request())
    body = orjson.loads(answer.payload)
    assert (body["type"], body["role"], body["model"]) == ("message", "assistant", "claude-mock")
    assert body["content"] == [{"type": "text", "text": "Mock answer to: hello there"}]
    assert (body["stop_reason"], body["hit"]) == ("end_turn", 1)
    assert body["usage"] == {"input_tokens": 4, "output_tokens": 5}  # system words count
    assert answer.usage == Usage(4, 5)


async def test_tools_give_tool_use_then_an_answer() -> None:
    """Offered tools get a tool_use block; a tool_result after it gets an answer using it."""
    first = orjson.loads((await mock().call(request({**BODY, "tools": TOOLS}))).payload)
    [use] = first["content"]
    assert (use["type"], use["name"], first["stop_reason"]) == ("tool_use", "search", "tool_use")
    result = {"type": "tool_result", "tool_use_id": use["id"], "content": "Paris"}
    follow = [*HELLO, {"role": "assistant", "content": first["content"]},
              {"role": "user", "content": [result]}]  # fmt: skip
    second = await mock().call(request({**BODY, "tools": TOOLS, "messages": follow}))
    assert orjson.loads(second.payload)["content"][0]["text"] == "Based on the tool: Paris"


async def test_stream_rebuilds_the_message() -> None:
    """The stream's events, in the API's order, rebuild the unary answer and its usage; each
    event's JSON starts with its type (the HTTP front names SSE events from it)."""
    up = mock(stream_chunks=2)
    chunks = [chunk async for chunk in up.stream(request())]
    parsed = [orjson.loads(chunk.data) for chunk in chunks]
    assert [p["type"] for p in parsed] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta"]  # fmt: skip
    text = "".join(p["delta"]["text"] for p in parsed if p["type"] == "content_block_delta")
    assert text == "Mock answer to: hello there"
    assert parsed[-1]["delta"]["stop_reason"] == "end_turn"
    assert (chunks[-1].usage, parsed[-1]["usage"]) == (Usage(4, 5), {"output_tokens": 5})
    assert all(chunk.data.startswith(b'{"type":"') for chunk in chunks)


async def test_streamed_tool_use() -> None:
    """A streamed tool_use block carries its input as one input_json_delta."""
    parsed = await events(mock(), {**BODY, "tools": TOOLS})
    delta = next(p["delta"] for p in parsed if p["type"] == "content_block_delta")
    assert delta["type"] == "input_json_delta"
    assert orjson.loads(delta["partial_json"]) == {"query": "hello there"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "m", "messages": HELLO}, "payload.max_tokens"),
        ({**BODY, "messages": "hi"}, "payload.messages"),
        ({**BODY, "system": 5}, "payload.system"),
    ],
)
def test_validate(body: dict[str, Any], field: str) -> None:
    """A request the Messages API would refuse is refused by the mock too."""
    with pytest.raises(errors.InvalidRequestError) as caught:
        mock().validate(request(body))
    assert caught.value.field == field


@pytest.mark.parametrize(("status", "kind"), [(529, "overloaded_error"), (429, "rate_limit_error")])
async def test_status_faults_are_anthropic_errors(status: int, kind: str) -> None:
    """failure_kind status fails unary calls and streams with Anthropic's error JSON."""
    up = mock(failure_rate=1.0, failure_status=status)
    with pytest.raises(errors.UpstreamError) as caught:
        await up.call(request())
    assert caught.value.http_status == status
    with pytest.raises(errors.UpstreamError) as streamed:
        await events(up)
    assert streamed.value.http_status == status
    if isinstance(caught.value, errors.UpstreamClientError):
        assert orjson.loads(caught.value.body)["error"]["type"] == kind


async def test_reset_cuts_a_messages_stream() -> None:
    """A reset stream yields its first events, then raises: never a clean end."""
    seen = []
    with pytest.raises(errors.UpstreamUnavailableError):
        async for chunk in mock(failure_rate=1.0, failure_kind="reset").stream(request()):
            seen.append(orjson.loads(chunk.data)["type"])
    assert seen[0] == "message_start" and "message_delta" not in seen
