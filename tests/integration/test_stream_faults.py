"""Streams under faults: the caller gets the whole answer or a clean error, never a truncated
success; exact attempts per upstream and wall-clock bounds. Through the official `openai`
client on the HTTP front, and a few through the gRPC SDK."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest

import tether
from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory
from tests.integration.stream_faults import GARBAGE, TEXT, StreamFaultServer
from tests.integration.support import LoopThread

HTTP = {"http": "127.0.0.1:0"}
HELLO = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "messages": HELLO}
# Small backoffs; a budget minimum generous enough for the retries of single calls.
FAST_RETRY = {"max_attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.05,
              "budget_min_retries": 10}  # fmt: skip
NO_RETRY = {**FAST_RETRY, "max_attempts": 1}


@pytest.fixture
def streams(loop_thread: LoopThread) -> Iterator[StreamFaultServer]:
    """The fault-injecting streaming upstream."""
    server = StreamFaultServer()
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


def model(
    streams: StreamFaultServer,
    name: str,
    *,
    retry: dict[str, Any] | None = None,
    stream: dict[str, float] | None = None,
    fallback: list[str] | None = None,
    continuation: str = "replay",
) -> dict[str, Any]:
    """A model upstream on the endpoint `name`, breaker off (each test counts attempts)."""
    policies = {"retry": retry or FAST_RETRY, "breaker": None, "stream": stream or {},
                "fallback": fallback or []}  # fmt: skip
    return {"kind": "model", "type": "openai", "base_url": streams.base_url(name),
            "policies": policies, "continuation": continuation}  # fmt: skip


def with_backup(
    make_sidecar: SidecarFactory, streams: StreamFaultServer, **primary: Any
) -> SidecarServer:
    """`primary` (falling back to `backup`, which answers) behind the HTTP front; a
    `continuation` given applies to both."""
    backup = {"continuation": primary["continuation"]} if "continuation" in primary else {}
    upstreams = {"primary": model(streams, "primary", fallback=["backup"], **primary),
                 "backup": model(streams, "backup", **backup)}  # fmt: skip
    return make_sidecar(upstreams, listen=HTTP)


def client(sidecar: SidecarServer) -> openai.OpenAI:
    assert sidecar.http_url is not None
    return openai.OpenAI(base_url=f"{sidecar.http_url}/v1", api_key="unused", max_retries=0)


def text_of(chunks: Any) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def read_to_error(api: openai.OpenAI) -> tuple[str, openai.APIError, float]:
    """Stream from `primary` until it raises: the text received, the error, the seconds."""
    received: list[Any] = []
    started = time.monotonic()
    with pytest.raises(openai.APIError) as caught:
        for chunk in api.chat.completions.create(model="primary", messages=HELLO, stream=True):
            received.append(chunk)
    return text_of(received), caught.value, time.monotonic() - started


def cut_count(sidecar: SidecarServer, reason: str) -> float:
    registry = sidecar.service.telemetry.metrics.registry
    value = registry.get_sample_value(
        "tether_streams_cut_total", {"upstream": "primary", "reason": reason}
    )
    return value or 0.0


def sdk_text(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# -- nothing sent yet: retry or fail over, the caller gets the whole answer --------------------


def test_ok_stream(make_sidecar: SidecarFactory, streams: StreamFaultServer) -> None:
    """A healthy stream arrives whole, with usage when asked for, in one attempt."""
    api = client(with_backup(make_sidecar, streams))
    chunks = list(api.chat.completions.create(model="primary", messages=HELLO, stream=True,
                                              stream_options={"include_usage": True}))  # fmt: skip
    assert text_of(chunks) == TEXT
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert (streams.endpoint("primary").hits, streams.endpoint("backup").hits) == (1, 0)


def test_the_usage_chunk_comes_only_when_asked_for(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """Without `stream_options.include_usage` no chunk has empty `choices`: the loop of
    OpenAI's own docs (`chunk.choices[0].delta.content`) runs to the end."""
    api = client(with_backup(make_sidecar, streams))
    text = ""
    for chunk in api.chat.completions.create(model="primary", messages=HELLO, stream=True):
        text += chunk.choices[0].delta.content or ""
    assert text == TEXT


def test_slow_first_chunk_fails_over(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """A first chunk slower than first_chunk_timeout_s fails over to the backup within ~0.5 s."""
    sidecar = with_backup(make_sidecar, streams, retry=NO_RETRY,
                          stream={"first_chunk_timeout_s": 0.3})  # fmt: skip
    primary = streams.endpoint("primary")
    primary.mode, primary.delay_s = "slow_first", 5.0
    api = client(sidecar)
    started = time.monotonic()
    raw = api.chat.completions.with_raw_response.create(
        model="primary", messages=HELLO, stream=True
    )
    text = text_of(raw.parse())
    elapsed = time.monotonic() - started
    assert text == TEXT
    assert raw.headers["X-Tether-Upstream"] == "backup"
    assert raw.headers["X-Tether-Attempts"] == "2"
    assert (primary.hits, streams.endpoint("backup").hits) == (1, 1)
    assert 0.3 <= elapsed < 0.9  # first_chunk_timeout_s + slack for a loaded machine


def test_silent_upstream_fails_over_after_its_first_timeout(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """A silent upstream with a fallback costs one first_chunk_timeout_s, not max_attempts
    of them: the backup answers after the first."""
    retry = {**FAST_RETRY, "max_attempts": 3}
    sidecar = with_backup(make_sidecar, streams, retry=retry,
                          stream={"first_chunk_timeout_s": 0.2})  # fmt: skip
    streams.endpoint("primary").mode = "silent"
    api = client(sidecar)
    started = time.monotonic()
    raw = api.chat.completions.with_raw_response.create(
        model="primary", messages=HELLO, stream=True
    )
    text = text_of(raw.parse())
    elapsed = time.monotonic() - started
    assert text == TEXT
    assert (streams.endpoint("primary").hits, streams.endpoint("backup").hits) == (1, 1)
    assert raw.headers["X-Tether-Attempts"] == "2"
    assert 0.2 <= elapsed < 0.2 + 0.4


def test_silent_upstream_without_fallback_is_retried(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """With nowhere to fail over, a silent upstream is retried up to max_attempts, each
    attempt cut at first_chunk_timeout_s, then the caller gets a clean 504."""
    retry = {**FAST_RETRY, "max_attempts": 2}
    spec = model(streams, "primary", retry=retry, stream={"first_chunk_timeout_s": 0.2})
    sidecar = make_sidecar({"primary": spec}, listen=HTTP)
    streams.endpoint("primary").mode = "silent"
    api = client(sidecar)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        text_of(api.chat.completions.create(model="primary", messages=HELLO, stream=True))
    elapsed = time.monotonic() - started
    assert info.value.status_code == 504
    assert streams.endpoint("primary").hits == 2
    assert 0.4 <= elapsed < 0.4 + 0.05 + 0.4


def test_first_chunk_timeout_defaults_to_attempt_timeout(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """Without policies.stream, the upstream's per-attempt timeout bounds the first chunk."""
    spec = model(streams, "primary", retry=NO_RETRY, fallback=["backup"])
    spec["policies"].pop("stream")
    spec["policies"]["timeout_s"] = 0.3
    sidecar = make_sidecar({"primary": spec, "backup": model(streams, "backup")}, listen=HTTP)
    streams.endpoint("primary").mode = "silent"
    started = time.monotonic()
    text = text_of(
        client(sidecar).chat.completions.create(model="primary", messages=HELLO, stream=True)
    )
    assert text == TEXT
    assert 0.3 <= time.monotonic() - started < 0.7


def test_reset_before_first_chunk_is_retried(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """A connection reset before any chunk is retried on the same upstream: whole answer."""
    sidecar = with_backup(make_sidecar, streams)
    primary = streams.endpoint("primary")
    primary.mode, primary.times = "reset", 1
    raw = client(sidecar).chat.completions.with_raw_response.create(
        model="primary", messages=HELLO, stream=True
    )
    assert text_of(raw.parse()) == TEXT
    assert raw.headers["X-Tether-Upstream"] == "primary"
    assert (primary.hits, streams.endpoint("backup").hits) == (2, 0)


def test_429_without_retry_after_retried_then_fails_over(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """A persistent 429 without Retry-After is retried max_attempts times, then fails over."""
    sidecar = with_backup(make_sidecar, streams)
    primary = streams.endpoint("primary")
    primary.mode, primary.status = "status", 429
    started = time.monotonic()
    text = text_of(
        client(sidecar).chat.completions.create(model="primary", messages=HELLO, stream=True)
    )
    assert text == TEXT
    assert (primary.hits, streams.endpoint("backup").hits) == (3, 1)
    assert time.monotonic() - started < 0.5


def test_429_long_retry_after_not_retried(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """A Retry-After beyond backoff_max_s is not retried: one attempt, a clean 429 with it."""
    sidecar = make_sidecar({"primary": model(streams, "primary")}, listen=HTTP)
    primary = streams.endpoint("primary")
    primary.mode, primary.status, primary.retry_after = "status", 429, "30"
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        client(sidecar).chat.completions.create(model="primary", messages=HELLO, stream=True)
    assert caught.value.response.headers["Retry-After"] == "30"
    assert primary.hits == 1
    assert time.monotonic() - started < 0.5


def test_429_long_retry_after_fails_over_at_once(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """With a backup, a Retry-After beyond backoff_max_s fails over at once."""
    sidecar = with_backup(make_sidecar, streams)
    primary = streams.endpoint("primary")
    primary.mode, primary.status, primary.retry_after = "status", 429, "30"
    started = time.monotonic()
    text = text_of(
        client(sidecar).chat.completions.create(model="primary", messages=HELLO, stream=True)
    )
    assert text == TEXT
    assert (primary.hits, streams.endpoint("backup").hits) == (1, 1)
    assert time.monotonic() - started < 0.5


def test_persistent_503_stops_at_max_attempts(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """A persistent 503 stops at max_attempts with a clean 502, never a tight loop."""
    sidecar = make_sidecar({"primary": model(streams, "primary")}, listen=HTTP)
    primary = streams.endpoint("primary")
    primary.mode, primary.status = "status", 503
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        client(sidecar).chat.completions.create(model="primary", messages=HELLO, stream=True)
    assert caught.value.status_code == 502
    assert primary.hits == 3
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("context_length_exceeded", "This model's maximum context length is 8192 tokens."),
        ("content_policy_violation", "Your request was rejected by the safety system."),
    ],
)
def test_unfixable_400_not_retried(
    make_sidecar: SidecarFactory, streams: StreamFaultServer, code: str, message: str
) -> None:
    """A 400 retrying cannot fix is neither retried nor fallen back on; the provider's code
    and message reach the caller unchanged."""
    sidecar = with_backup(make_sidecar, streams)
    primary = streams.endpoint("primary")
    primary.mode, primary.status, primary.error_code = "status", 400, code
    primary.message = message
    with pytest.raises(openai.BadRequestError) as caught:
        client(sidecar).chat.completions.create(model="primary", messages=HELLO, stream=True)
    assert caught.value.code == code
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"] == message
    assert (primary.hits, streams.endpoint("backup").hits) == (1, 0)


# -- chunks already sent: a clean in-band error, counted; never a truncated success ----------


def test_stall_mid_stream_errors(make_sidecar: SidecarFactory, streams: StreamFaultServer) -> None:
    """A stall after chunks were sent ends in an error within idle_timeout_s + 0.3 s."""
    sidecar = with_backup(
        make_sidecar, streams, stream={"idle_timeout_s": 0.3}, continuation="none"
    )
    streams.endpoint("primary").mode = "stall"
    text, error, elapsed = read_to_error(client(sidecar))
    assert text == "Hello from"
    assert error.code == "upstream_timeout"
    assert 0.3 <= elapsed < 0.9  # idle_timeout_s + slack for a loaded machine
    assert (streams.endpoint("primary").hits, streams.endpoint("backup").hits) == (1, 0)
    assert cut_count(sidecar, "timeout") == 1


def test_cut_mid_stream_errors(make_sidecar: SidecarFactory, streams: StreamFaultServer) -> None:
    """A connection closed mid-answer is an error, not fallen back on, and counted."""
    sidecar = with_backup(make_sidecar, streams, continuation="none")
    streams.endpoint("primary").mode = "cut"
    text, error, elapsed = read_to_error(client(sidecar))
    assert text == "Hello from"
    assert error.code == "upstream_unavailable"
    assert elapsed < 0.5
    assert (streams.endpoint("primary").hits, streams.endpoint("backup").hits) == (1, 0)
    assert cut_count(sidecar, "unavailable") == 1


def test_no_done_is_an_error(make_sidecar: SidecarFactory, streams: StreamFaultServer) -> None:
    """A stream ending without [DONE] and without a finish_reason is an error at once, even
    with all the words sent (the answer never said it ended)."""
    sidecar = with_backup(make_sidecar, streams, continuation="none")
    streams.endpoint("primary").mode = "no_done"
    text, error, elapsed = read_to_error(client(sidecar))
    assert text == TEXT
    assert error.code == "upstream_bad_response"
    assert elapsed < 0.5
    assert streams.endpoint("primary").hits == 1
    assert cut_count(sidecar, "badresponse") == 1


def test_malformed_chunk_is_an_error(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """A chunk that is not JSON fails the stream cleanly; the garbage never reaches the caller."""
    sidecar = with_backup(make_sidecar, streams, continuation="none")
    streams.endpoint("primary").mode = "malformed"
    text, error, _ = read_to_error(client(sidecar))
    assert text == "Hello from"
    assert error.code == "upstream_bad_response"
    assert GARBAGE.decode() not in text
    assert streams.endpoint("primary").hits == 1
    assert streams.endpoint("backup").hits == 0
    assert cut_count(sidecar, "badresponse") == 1


# -- the same through the gRPC SDK -------------------------------------------------------------


def test_grpc_slow_first_chunk_fails_over(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """Over gRPC, a slow first chunk fails over; the summary names the backup and 2 attempts."""
    sidecar = with_backup(make_sidecar, streams, retry=NO_RETRY,
                          stream={"first_chunk_timeout_s": 0.3})  # fmt: skip
    primary = streams.endpoint("primary")
    primary.mode, primary.delay_s = "slow_first", 5.0
    with tether.Client(sidecar.addresses[0]) as sdk:
        started = time.monotonic()
        stream = sdk.stream_model("primary", CHAT)
        chunks = list(stream)
        elapsed = time.monotonic() - started
    assert sdk_text(chunks) == TEXT
    assert (stream.summary.upstream, stream.summary.attempts) == ("backup", 2)
    assert stream.summary.usage.output_tokens == 5
    assert 0.3 <= elapsed < 0.9  # idle_timeout_s + slack for a loaded machine


def test_grpc_stall_mid_stream_errors(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """Over gRPC, a stall after the first chunks raises UpstreamTimeoutError, no summary."""
    sidecar = with_backup(
        make_sidecar, streams, stream={"idle_timeout_s": 0.3}, continuation="none"
    )
    streams.endpoint("primary").mode = "stall"
    chunks: list[Any] = []
    with tether.Client(sidecar.addresses[0]) as sdk:
        stream = sdk.stream_model("primary", CHAT)
        started = time.monotonic()
        with pytest.raises(tether.UpstreamTimeoutError):
            for chunk in stream:
                chunks.append(chunk)
        elapsed = time.monotonic() - started
    assert sdk_text(chunks) == "Hello from"
    assert not stream.summary.done
    assert 0.3 <= elapsed < 0.9  # idle_timeout_s + slack for a loaded machine
    assert streams.endpoint("backup").hits == 0


def test_grpc_caller_deadline_caps_first_chunk(
    make_sidecar: SidecarFactory, streams: StreamFaultServer
) -> None:
    """The caller's deadline caps first_chunk_timeout_s: a silent upstream fails at it."""
    spec = model(streams, "primary", stream={"first_chunk_timeout_s": 10})
    sidecar = make_sidecar({"primary": spec})
    streams.endpoint("primary").mode = "silent"
    with tether.Client(sidecar.addresses[0]) as sdk:
        started = time.monotonic()
        with pytest.raises(tether.DeadlineExceededError):
            list(sdk.stream_model("primary", CHAT, timeout_s=0.4))
        elapsed = time.monotonic() - started
    assert streams.endpoint("primary").hits == 1
    assert elapsed < 0.8
