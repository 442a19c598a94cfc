"""Mid-stream recovery on the Anthropic front, with the official `anthropic` client against
an upstream speaking the Messages API (which continues prefills and refuses one ending in
white space, as the API does): cut, stalled and overloaded streams end as one whole message;
a prompt too long goes to the context fallback."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from sidecar.server import SidecarServer
from tests.integration.anthropic_server import WORDS, MessagesFaultServer
from tests.integration.conftest import SidecarFactory
from tests.integration.test_anthropic_front import (
    HELLO,
    HTTP,
    _upstream_key,
    api_server,
    claude,
    client,
    front,
)

__all__ = ["_upstream_key", "api_server"]  # the fixtures, imported for this module's tests
WHOLE = "".join(WORDS)


def streamed(sidecar: SidecarServer) -> tuple[Any, list[str]]:
    """The final message the client's own accumulator builds, and every event type."""
    types: list[str] = []
    api = client(sidecar)
    with api.messages.stream(model="primary", max_tokens=64, messages=HELLO) as stream:
        for event in stream:
            types.append(event.type)
        return stream.get_final_message(), types


def texts(message: Any) -> list[str]:
    return [block.text for block in message.content if block.type == "text"]


@pytest.mark.parametrize(
    ("mode", "policies"),
    [("cut", {}), ("stall", {"stream": {"idle_timeout_s": 0.3}}), ("error_event", {})],
)
def test_a_broken_message_stream_is_replayed_whole(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer, mode: str,
    policies: dict[str, Any],
) -> None:  # fmt: skip
    """Cut, stalled, or failed with an in-band `overloaded_error` after two words: the same
    upstream streams the message again and the client ends with one text block holding the
    whole answer once, one message_start, one message_stop."""
    sidecar = front(make_sidecar, api_server, policies=policies)
    endpoint = api_server.endpoint("primary")
    endpoint.mode, endpoint.times = mode, 1
    message, types = streamed(sidecar)
    assert texts(message) == [WHOLE]
    assert types.count("message_start") == 1 and types.count("message_stop") == 1
    assert message.stop_reason == "end_turn"
    assert endpoint.hits == 2


def test_an_overloaded_primary_hands_the_stream_to_the_backup(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """The primary keeps failing with `overloaded_error` mid-stream: after its own replay
    fails too, the backup replays the message, and the client gets it whole."""
    sidecar = front(make_sidecar, api_server, backup=True)
    api_server.endpoint("primary").mode = "error_event"
    message, _ = streamed(sidecar)
    assert texts(message) == [WHOLE]
    assert (api_server.endpoint("primary").hits, api_server.endpoint("backup").hits) == (2, 1)


def test_a_prefill_continues_the_cut_block(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """The backup declares `prefill`: it is sent the delivered words as the assistant's
    start, and its continuation joins the block that was cut: one text block, whole."""
    primary = claude(api_server, "primary", fallback=["backup"], continuation="none")
    backup = claude(api_server, "backup", continuation="prefill")
    sidecar = make_sidecar({"primary": primary, "backup": backup}, listen=HTTP)
    api_server.endpoint("primary").mode = "cut"
    message, types = streamed(sidecar)
    assert texts(message) == [WHOLE]
    assert types.count("content_block_start") == 1
    _, body = api_server.endpoint("backup").requests[-1]
    assert body["messages"][-1] == {"role": "assistant", "content": "Hello from"}


def test_a_prefill_never_ends_in_white_space(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """Cut after "Hello from " (the API refuses a prefill ending in white space): the prefill
    is "Hello from", and the space the continuation begins with is not doubled."""
    primary = claude(api_server, "primary", fallback=["backup"], continuation="none")
    backup = claude(api_server, "backup", continuation="prefill")
    sidecar = make_sidecar({"primary": primary, "backup": backup}, listen=HTTP)
    words = ["Hello ", "from ", "the ", "stream"]
    endpoint = api_server.endpoint("primary")
    endpoint.mode, endpoint.chunks, endpoint.words = "cut", 2, words
    api_server.endpoint("backup").words = words
    message, _ = streamed(sidecar)
    assert texts(message) == ["Hello from the stream"]
    _, body = api_server.endpoint("backup").requests[-1]
    assert body["messages"][-1]["content"] == "Hello from"


def test_a_prompt_too_long_goes_to_the_context_fallback(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """Anthropic's "prompt is too long" 400 is not retried and is sent once to the route's
    context fallback, whose stream the client gets."""
    upstreams = {"primary": claude(api_server, "primary"), "big": claude(api_server, "big")}
    routes = {"claude": {"upstream": "primary", "context_fallback": "big"}}
    sidecar = make_sidecar(upstreams, listen=HTTP, routes=routes)
    endpoint = api_server.endpoint("primary")
    endpoint.mode, endpoint.status, endpoint.error_type = "status", 400, "invalid_request_error"
    endpoint.message = "prompt is too long: 250000 tokens > 200000 maximum"
    api = client(sidecar)
    with api.messages.stream(model="claude", max_tokens=64, messages=HELLO) as stream:
        message = stream.get_final_message()
    assert texts(message) == [WHOLE]
    assert (endpoint.hits, api_server.endpoint("big").hits) == (1, 1)


def test_without_recovery_the_client_raises(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """`continuation: none` everywhere: the cut reaches the client as an error event, never a
    final message."""
    sidecar = front(make_sidecar, api_server, backup=True, continuation="none")
    api_server.endpoint("primary").mode = "cut"
    with pytest.raises(anthropic.APIStatusError):
        streamed(sidecar)
