"""The OpenAI-compatible HTTP front, driven by the official `openai` client."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory, standard_upstreams
from tests.integration.support import UpstreamApp

HTTP = {"http": "127.0.0.1:0"}
HELLO = [{"role": "user", "content": "hi"}]


def client(sidecar: SidecarServer, api_key: str = "unused") -> openai.OpenAI:
    assert sidecar.http_url is not None
    return openai.OpenAI(base_url=f"{sidecar.http_url}/v1", api_key=api_key, max_retries=0)


@pytest.fixture
def front(make_sidecar: SidecarFactory, upstream: UpstreamApp) -> SidecarServer:
    """A sidecar with the HTTP front over the standard upstreams (each its own model)."""
    return make_sidecar(standard_upstreams(upstream.url), listen=HTTP)


def test_chat_completion(front: SidecarServer, upstream: UpstreamApp) -> None:
    """A unary chat completion reaches the real upstream and comes back parsed."""
    answer = client(front).chat.completions.create(model="llm", messages=HELLO)
    assert answer.choices[0].message.content == "echo: hi"
    assert answer.usage is not None and answer.usage.total_tokens == 10
    assert [seen.path for seen in upstream.seen] == ["/v1/chat/completions"]


def test_chat_headers(front: SidecarServer) -> None:
    """Unary answers carry the upstream, attempts, replayed and overhead headers."""
    raw = client(front).chat.completions.with_raw_response.create(model="llm", messages=HELLO)
    assert raw.headers["X-Tether-Upstream"] == "llm"
    assert raw.headers["X-Tether-Attempts"] == "1"
    assert raw.headers["X-Tether-Replayed"] == "false"
    assert float(raw.headers["X-Tether-Overhead-Ms"]) >= 0


def test_chat_stream(front: SidecarServer) -> None:
    """A streamed chat arrives chunk by chunk as SSE and ends cleanly."""
    stream = client(front).chat.completions.create(model="llm", messages=HELLO, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "Hello from the stream"


def test_chat_stream_mock(front: SidecarServer) -> None:
    """The built-in mock streams through the front too: usage in the last chunk when asked
    for, and every chunk with a choice when not."""
    api = client(front)
    chunks = list(api.chat.completions.create(model="mock", messages=HELLO, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].usage is not None
    plain = list(api.chat.completions.create(model="mock", messages=HELLO, stream=True))
    assert all(c.choices for c in plain) and len(plain) == len(chunks) - 1


def test_stream_cut_is_an_error(make_sidecar: SidecarFactory) -> None:
    """A stream cut after its first chunk, on an upstream that may not recover it
    (`continuation: none`), raises in the client, never a truncated success."""
    cut = {"kind": "model", "type": "mock", "fail_first": 1, "failure_kind": "garbage",
           "continuation": "none", "policies": {"retry": None}}  # fmt: skip
    sidecar = make_sidecar({"cut": cut}, listen=HTTP)
    stream = client(sidecar).chat.completions.create(model="cut", messages=HELLO, stream=True)
    with pytest.raises(openai.APIError, match="not JSON"):
        list(stream)


def test_stream_cut_is_replayed_whole(make_sidecar: SidecarFactory) -> None:
    """The same cut with the default `continuation: replay`: the same upstream answers again,
    its answer begins with what was delivered, and the caller gets exactly the answer of a
    healthy call, once."""
    cut = {"kind": "model", "type": "mock", "fail_first": 1, "failure_kind": "garbage",
           "policies": {"retry": None}}  # fmt: skip
    sidecar = make_sidecar({"cut": cut, "ok": {**cut, "fail_first": 0}}, listen=HTTP)
    api = client(sidecar)

    def text(model: str) -> str:
        stream = api.chat.completions.create(model=model, messages=HELLO, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    assert text("cut") == text("ok") != ""


def test_stream_failing_before_first_chunk(front: SidecarServer) -> None:
    """A stream whose upstream fails before any chunk is a plain 502 error."""
    with pytest.raises(openai.InternalServerError) as caught:
        client(front).chat.completions.create(model="broken", messages=HELLO, stream=True)
    assert caught.value.status_code == 502


def test_embeddings(front: SidecarServer) -> None:
    """Embeddings go to the real upstream's /embeddings and to the mock."""
    real = client(front).embeddings.create(model="llm", input=["abc", "de"])
    assert [item.embedding[0] for item in real.data] == [3.0, 2.0]
    mocked = client(front).embeddings.create(model="mock", input="abc")
    assert len(mocked.data) == 1 and mocked.data[0].embedding


def test_models_lists_routes(make_sidecar: SidecarFactory, upstream: UpstreamApp) -> None:
    """With routes configured, /v1/models lists them and a route picks its upstream."""
    routes = {"gpt-4o": {"upstream": "llm"}, "fake": {"upstream": "mock"}}
    sidecar = make_sidecar(standard_upstreams(upstream.url), listen=HTTP, routes=routes)
    api = client(sidecar)
    assert sorted(model.id for model in api.models.list()) == ["fake", "gpt-4o"]
    raw = api.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert raw.headers["X-Tether-Upstream"] == "llm"
    assert raw.parse().model == "gpt-4o"


def test_models_default_to_model_upstreams(front: SidecarServer) -> None:
    """Without routes, every model upstream is a model under its own name; tools are not."""
    ids = {model.id for model in client(front).models.list()}
    assert {"llm", "mock", "broken"} <= ids
    assert "search" not in ids


def test_unknown_model(front: SidecarServer) -> None:
    """An unknown model is a 404 `model_not_found` in OpenAI's shape."""
    with pytest.raises(openai.NotFoundError) as caught:
        client(front).chat.completions.create(model="gpt-nope", messages=HELLO)
    assert caught.value.code == "model_not_found"
    assert "gpt-nope" in caught.value.message


def test_upstream_400_passes_through(front: SidecarServer) -> None:
    """An upstream 400 is a BadRequestError carrying the provider's own message."""
    with pytest.raises(openai.BadRequestError) as caught:
        client(front).chat.completions.create(model="bad-request", messages=HELLO)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"] == "provider says 400"
    assert caught.value.type == "invalid_request_error"


def test_upstream_429(front: SidecarServer) -> None:
    """An upstream 429 is a RateLimitError with the upstream's Retry-After."""
    with pytest.raises(openai.RateLimitError) as caught:
        client(front).chat.completions.create(model="limited", messages=HELLO)
    assert caught.value.response.headers["Retry-After"] == "3"


def test_rate_limit_policy(make_sidecar: SidecarFactory) -> None:
    """The sidecar's own rate limit answers 429 with Retry-After in whole seconds."""
    limit = {"requests_per_s": 0.1, "burst": 1, "mode": "reject"}
    spec = {"kind": "model", "type": "mock", "policies": {"retry": None, "rate_limit": limit}}
    api = client(make_sidecar({"m": spec}, listen=HTTP))
    api.chat.completions.create(model="m", messages=HELLO)
    with pytest.raises(openai.RateLimitError) as caught:
        api.chat.completions.create(model="m", messages=HELLO)
    assert caught.value.code == "rate_limit_exceeded"
    assert 1 <= int(caught.value.response.headers["Retry-After"]) <= 10


def test_journaled_replay(front: SidecarServer, upstream: UpstreamApp) -> None:
    """Run id and key headers journal the call; the second call is replayed, not re-sent."""
    ident = {"X-Tether-Run-Id": "run-1", "Idempotency-Key": "step-1"}
    create = client(front).chat.completions.with_raw_response.create
    first = create(model="llm", messages=HELLO, extra_headers=ident)
    second = create(model="llm", messages=HELLO, extra_headers=ident)
    assert first.headers["X-Tether-Replayed"] == "false"
    assert second.headers["X-Tether-Replayed"] == "true"
    assert second.parse().choices[0].message.content == "echo: hi"
    assert len(upstream.seen) == 1


def test_journaled_stream_replay(front: SidecarServer, upstream: UpstreamApp) -> None:
    """A journaled stream replays its chunks from the journal."""
    ident = {"X-Tether-Run-Id": "run-2", "Idempotency-Key": "step-1"}
    api = client(front)
    texts = []
    for _ in range(2):
        stream = api.chat.completions.create(
            model="llm", messages=HELLO, stream=True, extra_headers=ident
        )
        texts.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    assert texts == ["Hello from the stream"] * 2
    assert len(upstream.seen) == 1


def test_run_id_without_key(front: SidecarServer) -> None:
    """A run id without an idempotency key is refused with 400, as on gRPC."""
    with pytest.raises(openai.BadRequestError) as caught:
        client(front).chat.completions.create(
            model="llm", messages=HELLO, extra_headers={"X-Tether-Run-Id": "run-3"}
        )
    assert caught.value.param == "idempotency_key"


def test_api_keys_never_echoed(
    make_sidecar: SidecarFactory, upstream: UpstreamApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither the caller's key nor the upstream's key leaks into errors or the upstream."""
    monkeypatch.setenv("TETHER_TEST_UPSTREAM_KEY", "sk-upstream-secret-123")
    spec: dict[str, Any] = {"kind": "model", "type": "openai", "policies": {"retry": None},
                            "base_url": f"{upstream.url}/echo-auth",
                            "api_key_env": "TETHER_TEST_UPSTREAM_KEY"}  # fmt: skip
    sidecar = make_sidecar({"echo": spec}, listen=HTTP)
    with pytest.raises(openai.APIStatusError) as caught:
        client(sidecar, api_key="sk-caller-key-456").chat.completions.create(
            model="echo", messages=HELLO
        )
    text = caught.value.response.text
    assert "sk-upstream-secret-123" not in text and "sk-caller-key-456" not in text
    assert "sk-caller-key-456" not in str(upstream.seen[0].headers)


def test_bearer_auth(make_sidecar: SidecarFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """With auth.token_env set, a wrong key is a 401 and the right key is served."""
    monkeypatch.setenv("TETHER_TEST_TOKEN", "front-token")
    spec = {"kind": "model", "type": "mock"}
    sidecar = make_sidecar({"m": spec}, listen=HTTP, auth={"token_env": "TETHER_TEST_TOKEN"})
    with pytest.raises(openai.AuthenticationError) as caught:
        client(sidecar, api_key="wrong").models.list()
    assert caught.value.code == "invalid_api_key"
    answer = client(sidecar, api_key="front-token").chat.completions.create(
        model="m", messages=HELLO
    )
    assert answer.choices


def test_draining_refuses(front: SidecarServer) -> None:
    """While draining (not serving), new HTTP calls get 503 `draining`."""
    front.service.serving = False
    with pytest.raises(openai.InternalServerError) as caught:
        client(front).chat.completions.create(model="mock", messages=HELLO)
    assert caught.value.status_code == 503
    assert caught.value.code == "draining"


def test_oversized_body(make_sidecar: SidecarFactory) -> None:
    """A body over limits.max_payload_bytes is a 413 in OpenAI's shape."""
    spec = {"kind": "model", "type": "mock"}
    sidecar = make_sidecar({"m": spec}, listen=HTTP, limits={"max_payload_bytes": 1024})
    big = [{"role": "user", "content": "x" * 4096}]
    with pytest.raises(openai.APIStatusError) as caught:
        client(sidecar).chat.completions.create(model="m", messages=big)
    assert caught.value.status_code == 413
    assert caught.value.code == "payload_too_large"
