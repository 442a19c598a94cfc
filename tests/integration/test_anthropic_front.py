"""Anthropic's Messages API through the HTTP front, driven by the official `anthropic` client,
against a real upstream speaking Anthropic's API on loopback: answers, error shapes and
exception types, stream faults (the caller gets the whole answer or a clean error, never a
truncated success), attempts per upstream and wall-clock bounds."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import yaml

from sidecar.config import default_config_text
from sidecar.server import SidecarServer
from tests.integration.anthropic_server import INPUT_TOKENS, MessagesFaultServer
from tests.integration.conftest import SidecarFactory
from tests.integration.stream_faults import GARBAGE, TEXT, WORDS
from tests.integration.support import LoopThread, sidecar_config, start_sidecar
from tests.integration.test_stream_faults import FAST_RETRY, HTTP, NO_RETRY, cut_count

KEY_ENV = "TETHER_TEST_ANTHROPIC_KEY"
KEY = "sk-ant-upstream-SECRET-77"
HELLO: list[Any] = [{"role": "user", "content": "hi"}]
TOO_LONG = "prompt is too long: 210000 tokens > 200000 maximum"


@pytest.fixture(autouse=True)
def _upstream_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


@pytest.fixture
def api_server(loop_thread: LoopThread) -> Iterator[MessagesFaultServer]:
    """The fault-injecting upstream speaking Anthropic's Messages API."""
    server = MessagesFaultServer()
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


def claude(
    server: MessagesFaultServer,
    name: str,
    *,
    retry: dict[str, Any] | None = None,
    breaker: dict[str, Any] | None = None,
    fallback: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """An anthropic upstream on the endpoint `name`; breaker off unless given."""
    policies = {"retry": retry or FAST_RETRY, "breaker": breaker, "fallback": fallback or [],
                **extra.pop("policies", {})}  # fmt: skip
    return {"kind": "model", "type": "anthropic", "base_url": server.base_url(name),
            "api_key_env": KEY_ENV, "policies": policies, **extra}  # fmt: skip


def front(
    make_sidecar: SidecarFactory, server: MessagesFaultServer, backup: bool = False, **primary: Any
) -> SidecarServer:
    """`primary` (falling back to `backup`, which answers, when `backup`) behind the front;
    a `continuation` given applies to both."""
    upstreams = {"primary": claude(server, "primary", fallback=["backup"] if backup else None,
                                   **primary)}  # fmt: skip
    if backup:
        extra = {"continuation": primary["continuation"]} if "continuation" in primary else {}
        upstreams["backup"] = claude(server, "backup", **extra)
    return make_sidecar(upstreams, listen=HTTP)


def client(sidecar: SidecarServer, api_key: str = "sk-caller-key", **options: Any) -> Any:
    assert sidecar.http_url is not None
    return anthropic.Anthropic(base_url=sidecar.http_url, api_key=api_key, max_retries=0,
                               **options)  # fmt: skip


def create(api: Any, model: str = "primary", **options: Any) -> Any:
    return api.messages.create(model=model, max_tokens=64, messages=HELLO, **options)


def hits(server: MessagesFaultServer) -> tuple[int, int]:
    return server.endpoint("primary").hits, server.endpoint("backup").hits


def read_to_error(api: Any) -> tuple[str, list[str], anthropic.APIStatusError, float]:
    """Stream `primary` until it raises: the text, the event types, the error, the seconds."""
    events: list[Any] = []
    started = time.monotonic()
    with pytest.raises(anthropic.APIStatusError) as caught:
        for event in create(api, stream=True):
            events.append(event)
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    return text, [e.type for e in events], caught.value, time.monotonic() - started


# -- answers -----------------------------------------------------------------------------------


def test_messages_create(make_sidecar: SidecarFactory, api_server: MessagesFaultServer) -> None:
    """messages.create reaches /v1/messages of the real upstream with the configured key and
    version (never the caller's key) and comes back parsed, with usage and X-Tether headers."""
    raw = client(front(make_sidecar, api_server)).messages.with_raw_response.create(
        model="primary", max_tokens=64, messages=HELLO
    )
    message = raw.parse()
    assert message.content[0].text == TEXT
    assert (message.usage.input_tokens, message.usage.output_tokens) == (INPUT_TOKENS, 5)
    assert (raw.headers["X-Tether-Upstream"], raw.headers["X-Tether-Attempts"]) == ("primary", "1")
    assert raw.headers["X-Tether-Replayed"] == "false"
    [(headers, body)] = api_server.endpoint("primary").requests
    assert headers["x-api-key"] == KEY and "sk-caller-key" not in str(headers)
    assert headers["anthropic-version"] == "2023-06-01"
    assert body["messages"] == HELLO and not body.get("stream")


def test_messages_stream_helper(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """messages.stream assembles the text and the final message with its usage."""
    api = client(front(make_sidecar, api_server))
    with api.messages.stream(model="primary", max_tokens=64, messages=HELLO) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == TEXT == final.content[0].text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (INPUT_TOKENS, 5)
    assert final.stop_reason == "end_turn"
    assert api_server.endpoint("primary").requests[0][1]["stream"] is True


def test_create_stream_events(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """create(stream=True) yields Anthropic's events in order, ending with message_stop."""
    types = [event.type for event in create(client(front(make_sidecar, api_server)), stream=True)]
    assert types == ["message_start", "content_block_start",
                     *["content_block_delta"] * len(WORDS),
                     "content_block_stop", "message_delta", "message_stop"]  # fmt: skip


def test_journaled_replay(make_sidecar: SidecarFactory, api_server: MessagesFaultServer) -> None:
    """With a run id and key, the second call (unary, then streamed) is replayed, not sent."""
    api = client(front(make_sidecar, api_server))
    ident = {"X-Tether-Run-Id": "run-a", "Idempotency-Key": "step-1"}
    raws = [api.messages.with_raw_response.create(model="primary", max_tokens=64,
                                                  messages=HELLO, extra_headers=ident)
            for _ in range(2)]  # fmt: skip
    assert [raw.headers["X-Tether-Replayed"] for raw in raws] == ["false", "true"]
    assert raws[1].parse().content[0].text == TEXT
    streamed = {**ident, "Idempotency-Key": "step-2"}
    texts = []
    for _ in range(2):
        with api.messages.stream(model="primary", max_tokens=64, messages=HELLO,
                                 extra_headers=streamed) as stream:  # fmt: skip
            texts.append("".join(stream.text_stream))
    assert texts == [TEXT, TEXT]
    assert api_server.endpoint("primary").hits == 2


def test_mock_serves_messages_with_the_default_config(
    loop_thread: LoopThread, short_tmp: Path
) -> None:
    """The embedded defaults' mocks (no keys, no network) answer /v1/messages, unary and
    streamed, and Anthropic's client lists them as models."""
    defaults = yaml.safe_load(default_config_text())
    config = sidecar_config(str(short_tmp / "d.sock"), defaults["upstreams"], listen=HTTP)
    sidecar = loop_thread.run(start_sidecar(config))
    try:
        api = client(sidecar)
        answer = create(api, model="llm-backup", system="be brief")
        assert answer.content[0].text == "Mock answer to: hi"
        assert answer.usage.input_tokens == 3
        with api.messages.stream(model="llm-backup", max_tokens=64, messages=HELLO) as stream:
            assert "".join(stream.text_stream) == "Mock answer to: hi"
            assert stream.get_final_message().usage.output_tokens == 4
        models = {model.id for model in api.models.list()}
        assert models == {"llm", "llm-backup", "llm-flaky", "llm-cut"}
    finally:
        loop_thread.run(sidecar.drain(0))


# -- error shapes and exception types ----------------------------------------------------------


def test_unknown_model(make_sidecar: SidecarFactory, api_server: MessagesFaultServer) -> None:
    """An unknown model is NotFoundError in Anthropic's shape, naming the model."""
    with pytest.raises(anthropic.NotFoundError) as caught:
        create(client(front(make_sidecar, api_server)), model="claude-nope")
    assert caught.value.type == "not_found_error"
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "error"
    assert "claude-nope" in str(caught.value.api_message)


def test_openai_route_is_refused(make_sidecar: SidecarFactory) -> None:
    """A model routed to an OpenAI upstream is a 400 naming the model and why; no call."""
    spec = {"kind": "model", "type": "openai", "base_url": "http://127.0.0.1:9/v1"}
    sidecar = make_sidecar({"llm": spec}, listen=HTTP, routes={"gpt-x": {"upstream": "llm"}})
    with pytest.raises(anthropic.BadRequestError) as caught:
        create(client(sidecar), model="gpt-x")
    assert caught.value.type == "invalid_request_error"
    assert "'gpt-x'" in str(caught.value.api_message)
    assert "does not take Anthropic Messages" in str(caught.value.api_message)
    assert client(sidecar).models.list().data == []


def test_front_auth(make_sidecar: SidecarFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """With auth.token_env, a wrong x-api-key is AuthenticationError; the token is accepted
    as x-api-key (api_key=) and as a bearer token (auth_token=)."""
    monkeypatch.setenv("TETHER_TEST_TOKEN", "front-token")
    spec = {"kind": "model", "type": "mock"}
    sidecar = make_sidecar({"m": spec}, listen=HTTP, auth={"token_env": "TETHER_TEST_TOKEN"})
    with pytest.raises(anthropic.AuthenticationError) as caught:
        create(client(sidecar, api_key="wrong"), model="m")
    assert caught.value.type == "authentication_error"
    assert create(client(sidecar, api_key="front-token"), model="m").content
    bearer = anthropic.Anthropic(base_url=sidecar.http_url, auth_token="front-token",
                                 max_retries=0)  # fmt: skip
    assert create(bearer, model="m").content


def test_request_too_large(make_sidecar: SidecarFactory) -> None:
    """A body over limits.max_payload_bytes is 413 request_too_large."""
    spec = {"kind": "model", "type": "mock"}
    sidecar = make_sidecar({"m": spec}, listen=HTTP, limits={"max_payload_bytes": 1024})
    with pytest.raises(anthropic.APIStatusError) as caught:
        client(sidecar).messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "x" * 4096}]
        )
    assert (caught.value.status_code, caught.value.type) == (413, "request_too_large")


def test_prompt_too_long_not_retried(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """A prompt-too-long 400 is neither retried nor fallen back on; the provider's error
    reaches the caller unchanged."""
    sidecar = front(make_sidecar, api_server, backup=True)
    primary = api_server.endpoint("primary")
    primary.mode, primary.status = "status", 400
    primary.error_type, primary.message = "invalid_request_error", TOO_LONG
    with pytest.raises(anthropic.BadRequestError) as caught:
        create(client(sidecar))
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": TOO_LONG},
    }
    assert hits(api_server) == (1, 0)


def test_429_with_long_retry_after(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """A Retry-After beyond backoff_max_s is not waited for: one attempt, RateLimitError
    with retry-after, at once."""
    primary = api_server.endpoint("primary")
    primary.mode, primary.status, primary.retry_after = "status", 429, "30"
    primary.error_type = "rate_limit_error"
    started = time.monotonic()
    with pytest.raises(anthropic.RateLimitError) as caught:
        create(client(front(make_sidecar, api_server)))
    assert caught.value.response.headers["retry-after"] == "30"
    assert caught.value.type == "rate_limit_error"
    assert primary.hits == 1
    assert time.monotonic() - started < 0.5


def test_429_short_retry_after_is_waited_for(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """A 429 with a short Retry-After is retried no sooner than it says, then answers."""
    retry = {**FAST_RETRY, "backoff_max_s": 1.0}
    sidecar = front(make_sidecar, api_server, retry=retry)
    primary = api_server.endpoint("primary")
    primary.mode, primary.times, primary.status, primary.retry_after = "status", 1, 429, "0.3"
    assert create(client(sidecar)).content[0].text == TEXT
    assert primary.hits == 2
    assert 0.3 <= primary.hit_times[1] - primary.hit_times[0] < 0.6


def test_429_without_retry_after_fails_over(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """A persistent 429 without Retry-After is retried max_attempts times, then the backup
    streams the answer; no tight loop."""
    sidecar = front(make_sidecar, api_server, backup=True)
    primary = api_server.endpoint("primary")
    primary.mode, primary.status, primary.error_type = "status", 429, "rate_limit_error"
    started = time.monotonic()
    with client(sidecar).messages.stream(model="primary", max_tokens=64, messages=HELLO) as s:
        assert "".join(s.text_stream) == TEXT
    assert hits(api_server) == (3, 1)
    assert time.monotonic() - started < 0.5


def test_overloaded_529(make_sidecar: SidecarFactory, api_server: MessagesFaultServer) -> None:
    """A persistent 529 is retried (it is in the default retry_on) to max_attempts, then
    the caller gets Anthropic's OverloadedError (529, overloaded_error)."""
    primary = api_server.endpoint("primary")
    primary.mode, primary.status, primary.message = "status", 529, "Overloaded"
    started = time.monotonic()
    with pytest.raises(anthropic.OverloadedError) as caught:
        create(client(front(make_sidecar, api_server, retry=FAST_RETRY)))
    assert (caught.value.status_code, caught.value.type) == (529, "overloaded_error")
    assert primary.hits == 3
    assert time.monotonic() - started < 0.5


def test_breaker_open_without_fallback(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """Once the breaker opens, calls get 503 overloaded_error with retry-after at once; the
    upstream is not called."""
    breaker = {"fail_max": 1, "reset_timeout_s": 30}
    sidecar = front(make_sidecar, api_server, retry=NO_RETRY, breaker=breaker)
    primary = api_server.endpoint("primary")
    primary.mode, primary.status = "status", 529
    with pytest.raises(anthropic.OverloadedError):
        create(client(sidecar))
    with pytest.raises(anthropic.ServiceUnavailableError) as caught:
        create(client(sidecar))
    assert caught.value.type == "overloaded_error"
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 30
    assert primary.hits == 1


def test_deadline_is_504(make_sidecar: SidecarFactory, api_server: MessagesFaultServer) -> None:
    """An upstream silent past its timeout_s is 504 timeout_error, bounded by it."""
    sidecar = front(make_sidecar, api_server, retry=NO_RETRY, timeout_s=0.3)
    api_server.endpoint("primary").mode = "silent"
    started = time.monotonic()
    with pytest.raises(anthropic.GatewayTimeoutError) as caught:
        create(client(sidecar))
    assert caught.value.type == "timeout_error"
    assert 0.3 <= time.monotonic() - started < 0.7


# -- streams: before the first chunk, retry or fail over ---------------------------------------


def test_529_before_first_chunk_fails_over(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """A 529 before any event, with no retry left, fails over: the backup streams the
    whole answer and the headers say so."""
    sidecar = front(make_sidecar, api_server, backup=True, retry=NO_RETRY)
    api_server.endpoint("primary").mode = "status"
    api_server.endpoint("primary").status = 529
    raw = client(sidecar).messages.with_raw_response.create(
        model="primary", max_tokens=64, messages=HELLO, stream=True
    )
    events = list(raw.parse())
    assert events[-1].type == "message_stop"
    assert (raw.headers["X-Tether-Upstream"], raw.headers["X-Tether-Attempts"]) == ("backup", "2")
    assert hits(api_server) == (1, 1)


def test_529_before_first_chunk_retried(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """One 529 before any event is retried on the same upstream (default retry_on)."""
    sidecar = front(make_sidecar, api_server, backup=True, retry=FAST_RETRY)
    primary = api_server.endpoint("primary")
    primary.mode, primary.times, primary.status = "status", 1, 529
    with client(sidecar).messages.stream(model="primary", max_tokens=64, messages=HELLO) as s:
        assert "".join(s.text_stream) == TEXT
    assert hits(api_server) == (2, 0)


def test_overloaded_event_first_fails_over(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """An in-band overloaded error as the stream's first event is a failure before any
    chunk: with no retry left, the backup answers."""
    sidecar = front(make_sidecar, api_server, backup=True, retry=NO_RETRY)
    api_server.endpoint("primary").mode = "error_first"
    with client(sidecar).messages.stream(model="primary", max_tokens=64, messages=HELLO) as s:
        assert "".join(s.text_stream) == TEXT
    assert hits(api_server) == (1, 1)


# -- streams: chunks already sent, an in-band error, counted -----------------------------------


def test_cut_mid_answer(make_sidecar: SidecarFactory, api_server: MessagesFaultServer) -> None:
    """A connection cut mid-answer ends the stream with an in-band error event (the client
    raises), no message_stop, no fallback; counted as a cut stream."""
    sidecar = front(make_sidecar, api_server, backup=True, continuation="none")
    api_server.endpoint("primary").mode = "cut"
    text, types, error, elapsed = read_to_error(client(sidecar))
    assert text == "Hello from" and "message_stop" not in types
    assert error.type == "api_error"
    assert hits(api_server) == (1, 0)
    assert elapsed < 0.5
    assert cut_count(sidecar, "unavailable") == 1


def test_cut_fails_the_stream_helper(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """messages.stream over a cut stream raises; it never yields a final message."""
    api_server.endpoint("primary").mode = "cut"
    api = client(front(make_sidecar, api_server))
    with (
        pytest.raises(anthropic.APIStatusError),
        api.messages.stream(model="primary", max_tokens=64, messages=HELLO) as stream,
    ):
        stream.get_final_message()


def test_no_message_stop(make_sidecar: SidecarFactory, api_server: MessagesFaultServer) -> None:
    """A stream that ends without message_stop is an error, even with every word sent."""
    sidecar = front(make_sidecar, api_server, continuation="none")
    api_server.endpoint("primary").mode = "no_stop"
    text, types, error, elapsed = read_to_error(client(sidecar))
    assert text == TEXT and "message_stop" not in types
    assert error.type == "api_error" and "message_stop" in str(error.api_message)
    assert elapsed < 0.5
    assert cut_count(sidecar, "badresponse") == 1


def test_malformed_event(make_sidecar: SidecarFactory, api_server: MessagesFaultServer) -> None:
    """An event that is not JSON fails the stream cleanly; the garbage never reaches the
    caller."""
    sidecar = front(make_sidecar, api_server, backup=True, continuation="none")
    api_server.endpoint("primary").mode = "malformed"
    text, types, error, _ = read_to_error(client(sidecar))
    assert text == "Hello from" and GARBAGE.decode() not in text
    assert types.count("content_block_delta") == 2 and error.type == "api_error"
    assert hits(api_server) == (1, 0)
    assert cut_count(sidecar, "badresponse") == 1


def test_overloaded_event_mid_stream(
    make_sidecar: SidecarFactory, api_server: MessagesFaultServer
) -> None:
    """The upstream's in-band overloaded_error after some text reaches the caller as an
    in-band overloaded_error."""
    sidecar = front(make_sidecar, api_server, backup=True, continuation="none")
    api_server.endpoint("primary").mode = "error_event"
    text, _, error, _ = read_to_error(client(sidecar))
    assert text == "Hello from"
    assert error.type == "overloaded_error"
    assert hits(api_server) == (1, 0)
    assert cut_count(sidecar, "529") == 1


def test_stall_mid_stream(make_sidecar: SidecarFactory, api_server: MessagesFaultServer) -> None:
    """A stall after some text ends in an in-band timeout_error within idle_timeout_s."""
    sidecar = front(
        make_sidecar, api_server, policies={"stream": {"idle_timeout_s": 0.3}}, continuation="none"
    )
    api_server.endpoint("primary").mode = "stall"
    text, _, error, elapsed = read_to_error(client(sidecar))
    assert text == "Hello from"
    assert error.type == "timeout_error"
    assert 0.3 <= elapsed < 0.6
    assert cut_count(sidecar, "timeout") == 1
