"""Routes of the HTTP front: a route's own fallback list, and a context fallback that takes
requests the others refused as longer than their context window. Real sidecar, the official
`openai` client, a real fault-injecting upstream."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory
from tests.integration.stream_faults import TEXT, StreamFaultServer
from tests.integration.test_stream_faults import HELLO, HTTP, client, model, streams, text_of

__all__ = ["streams"]  # the fixture, imported for this module's tests

CONTEXT_MESSAGE = "This model's maximum context length is 8192 tokens."


def mock_model() -> dict[str, Any]:
    return {"type": "mock", "kind": "model", "policies": {"breaker": None}}


def routed(
    make_sidecar: SidecarFactory, streams: StreamFaultServer, routes: dict[str, Any]
) -> SidecarServer:
    """`primary` (no fallback of its own), `backup` and `big` behind the front, `routes`."""
    upstreams = {name: model(streams, name) for name in ("primary", "backup", "big")}
    upstreams["local"] = mock_model()
    return make_sidecar(upstreams, listen=HTTP, routes=routes)


def too_long(streams: StreamFaultServer, name: str) -> None:
    endpoint = streams.endpoint(name)
    endpoint.mode, endpoint.status = "status", 400
    endpoint.error_code, endpoint.message = "context_length_exceeded", CONTEXT_MESSAGE


def test_route_fallback_list_replaces_the_upstreams(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """Two models on one upstream: only the route that lists a fallback fails over."""
    routes = {"gpt-4o": {"upstream": "primary", "fallback": ["backup"]},
              "gpt-4o-strict": {"upstream": "primary"}}  # fmt: skip
    sidecar = routed(make_sidecar, streams, routes)
    primary = streams.endpoint("primary")
    primary.mode, primary.status = "status", 503
    api = client(sidecar)
    raw = api.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO, stream=True)
    assert text_of(raw.parse()) == TEXT
    assert raw.headers["X-Tether-Upstream"] == "backup"
    with pytest.raises(openai.InternalServerError):
        api.chat.completions.create(model="gpt-4o-strict", messages=HELLO, stream=True)
    assert streams.endpoint("backup").hits == 1
    assert [m.id for m in api.models.list()] == ["gpt-4o", "gpt-4o-strict"]


def test_route_fallback_serves_unary_calls(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """A route's fallback list holds for unary calls too; the mock takes openai requests."""
    routes = {"gpt-4o": {"upstream": "primary", "fallback": ["local"]}}
    sidecar = routed(make_sidecar, streams, routes)
    primary = streams.endpoint("primary")
    primary.mode, primary.status = "status", 503
    raw = client(sidecar).chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert raw.headers["X-Tether-Upstream"] == "local"
    assert raw.parse().choices[0].message.content
    assert primary.hits == 3  # its own retries (FAST_RETRY), then the fallback


def test_context_overflow_goes_to_the_context_fallback(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """A context-length 400 is not retried and skips the ordinary fallbacks: the larger-
    context upstream answers, once, and the response names it."""
    routes = {"gpt-4o": {"upstream": "primary", "fallback": ["backup"],
                         "context_fallback": "big"}}  # fmt: skip
    sidecar = routed(make_sidecar, streams, routes)
    too_long(streams, "primary")
    streams.endpoint("big").model = "big-context-model"
    raw = client(sidecar).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HELLO, stream=True
    )
    chunks = list(raw.parse())
    assert text_of(chunks) == TEXT
    assert {c.model for c in chunks} == {"big-context-model"}
    assert raw.headers["X-Tether-Upstream"] == "big"
    assert raw.headers["X-Tether-Attempts"] == "2"
    hits = [streams.endpoint(name).hits for name in ("primary", "backup", "big")]
    assert hits == [1, 0, 1]


def test_context_overflow_everywhere_reaches_the_caller_unchanged(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """When the context fallback is too small as well, the provider's 400 reaches the caller
    as it was sent, after one attempt on each."""
    routes = {"gpt-4o": {"upstream": "primary", "context_fallback": "big"}}
    sidecar = routed(make_sidecar, streams, routes)
    too_long(streams, "primary")
    too_long(streams, "big")
    with pytest.raises(openai.BadRequestError) as caught:
        client(sidecar).chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    assert caught.value.code == "context_length_exceeded"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"] == CONTEXT_MESSAGE
    assert [streams.endpoint(n).hits for n in ("primary", "big")] == [1, 1]


def test_other_400s_do_not_use_the_context_fallback(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """A content-policy 400 is the caller's to fix: no retry, no fallback of either kind."""
    routes = {"gpt-4o": {"upstream": "primary", "fallback": ["backup"],
                         "context_fallback": "big"}}  # fmt: skip
    sidecar = routed(make_sidecar, streams, routes)
    primary = streams.endpoint("primary")
    primary.mode, primary.status = "status", 400
    primary.error_code, primary.message = "content_policy_violation", "Rejected by policy."
    with pytest.raises(openai.BadRequestError) as caught:
        client(sidecar).chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    assert caught.value.code == "content_policy_violation"
    assert [streams.endpoint(n).hits for n in ("primary", "backup", "big")] == [1, 0, 0]
