"""The failover matrix: each fault of a provider that behaves like OpenAI's API, what the
caller (the official `openai` client on the HTTP front) sees, and exactly what the provider
logged: attempts per model and the gaps between them."""

from __future__ import annotations

import itertools
import time
from typing import Any

import openai
import pytest

from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory
from tests.integration.provider import (
    FAST_RETRY,
    HI,
    POLICY_MESSAGE,
    SNAPSHOT,
    Provider,
    answer_text,
    openai_client,
)

HTTP = {"http": "127.0.0.1:0"}


def pair(make_sidecar: SidecarFactory, provider: Provider, **policies: Any) -> SidecarServer:
    """Route `chat`: upstream `primary` (model `primary-model`, `policies`) falling back to
    upstream `backup` (model `backup-model`), breakers off."""

    def spec(model: str, **extra: Any) -> dict[str, Any]:
        policies = {"retry": FAST_RETRY, "breaker": None, **extra}
        return {"kind": "model", "type": "openai", "base_url": provider.base_url,
                "model": model, "policies": policies}  # fmt: skip

    provider.model("primary-model")
    provider.model("backup-model")
    upstreams = {"primary": spec("primary-model", **policies), "backup": spec("backup-model")}
    routes = {"chat": {"upstream": "primary", "fallback": ["backup"]}}
    return make_sidecar(upstreams, listen=HTTP, routes=routes)


def client(sidecar: SidecarServer) -> openai.OpenAI:
    return openai_client(sidecar.http_url)


def streamed(api: openai.OpenAI) -> tuple[str, set[str]]:
    """The text of a streamed answer of route `chat`, and the models its chunks name."""
    text, models = "", set()
    for chunk in api.chat.completions.create(model="chat", messages=HI, stream=True):
        text += chunk.choices[0].delta.content or ""
        models.add(chunk.model)
    return text, models


def test_a_stream_without_done_after_finish_reason_is_complete(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """Every choice ended with a finish_reason and the body ended cleanly, without
    `data: [DONE]`: the whole answer, once, from the primary."""
    sidecar = pair(make_sidecar, provider)
    provider.model("primary-model").fail("no_done")
    text, models = streamed(client(sidecar))
    assert text == answer_text("hi")
    assert models == {"primary-model" + SNAPSHOT}
    assert provider.models_tried() == ["primary-model"]


def silent_pair(make_sidecar: SidecarFactory, provider: Provider, **policies: Any) -> Any:
    """Only `primary` (no fallback), silent on every request."""
    provider.model("primary-model").fail(*["silent"] * 10)
    spec = {"kind": "model", "type": "openai", "base_url": provider.base_url,
            "model": "primary-model", "timeout_s": 0.5, "policies": policies}  # fmt: skip
    return make_sidecar({"primary": spec}, listen=HTTP)


def test_a_silent_upstream_ends_in_a_clean_504_after_one_retry(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """Default policies (a 0.5 s attempt timeout, to keep the test short): the timed-out
    attempt is retried once, then the call ends with a 504 naming the timeout; the provider
    saw two requests, both cancelled."""
    sidecar = silent_pair(make_sidecar, provider)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        client(sidecar).chat.completions.create(model="primary", messages=HI)
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    assert caught.value.response.headers["X-Tether-Attempts"] == "2"
    assert 1.0 <= elapsed < 5.0
    assert len(provider.tried("primary-model")) == 2
    wait_until(lambda: provider.cancelled == 2)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("header", ["x-stainless-read-timeout", "X-Tether-Timeout-S"])
def test_the_callers_timeout_bounds_the_call(
    make_sidecar: SidecarFactory, provider: Provider, header: str, stream: bool
) -> None:
    """The caller's timeout, as the official client sends it (its read timeout) or as
    X-Tether-Timeout-S: a 0.6 s deadline ends a call (or a stream's wait for its first
    chunk) to an upstream with a 60 s attempt timeout at 0.6 s with a 504, one attempt, the
    upstream request cancelled."""
    provider.model("primary-model").fail("silent")
    spec = {"kind": "model", "type": "openai", "base_url": provider.base_url,
            "model": "primary-model"}  # fmt: skip
    sidecar = make_sidecar({"primary": spec}, listen=HTTP)
    api = client(sidecar).with_options(timeout=30.0)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        api.chat.completions.create(model="primary", messages=HI, stream=stream,
                                    extra_headers={header: "0.6"})  # fmt: skip
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    assert 0.6 <= elapsed < 3.0
    assert len(provider.tried("primary-model")) == 1
    wait_until(lambda: provider.cancelled == 1)


def test_the_official_client_sends_its_read_timeout() -> None:
    """What the test above relies on: the openai client sends its read timeout, in seconds,
    as x-stainless-read-timeout (and the Anthropic client too)."""
    import anthropic
    import httpx2  # what the clients are built on

    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return httpx2.Response(500)

    transport = httpx2.MockTransport(handler)
    api = openai.OpenAI(api_key="k", base_url="http://x/v1", max_retries=0, timeout=7.5,
                        http_client=httpx2.Client(transport=transport))  # fmt: skip
    with pytest.raises(openai.APIStatusError):
        api.chat.completions.create(model="m", messages=HI)
    claude = anthropic.Anthropic(api_key="k", base_url="http://x", max_retries=0, timeout=8.5,
                                 http_client=httpx2.Client(transport=transport))  # fmt: skip
    with pytest.raises(anthropic.APIStatusError):
        claude.messages.create(model="m", max_tokens=5, messages=HI)  # type: ignore[arg-type]
    assert seen[0].headers["x-stainless-read-timeout"] == "7.5"
    assert seen[1].headers["x-stainless-read-timeout"] == "8.5"


def test_a_bad_timeout_header_is_a_clear_400(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """X-Tether-Timeout-S that is not a positive number: a 400 naming the header, and nothing
    reaches the provider."""
    sidecar = pair(make_sidecar, provider)
    with pytest.raises(openai.BadRequestError) as caught:
        client(sidecar).chat.completions.create(
            model="chat", messages=HI, extra_headers={"X-Tether-Timeout-S": "soon"}
        )
    assert "X-Tether-Timeout-S" in str(caught.value)
    assert provider.attempts == []


def wait_until(condition: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


@pytest.mark.parametrize(("deadline_s", "budget_s"), [(0.5, 120.0), (30.0, 0.5)])
def test_over_grpc_the_tighter_of_deadline_and_budget_wins(
    make_sidecar: SidecarFactory, provider: Provider, deadline_s: float, budget_s: float
) -> None:
    """A gRPC caller's deadline under the budget, or a budget under the deadline: the call
    to a silent upstream ends after 0.5 s with a deadline error and one attempt."""
    import tether

    provider.model("primary-model").fail("silent")
    spec = {"kind": "model", "type": "openai", "base_url": provider.base_url,
            "model": "primary-model", "policies": {"total_timeout_s": budget_s}}  # fmt: skip
    sidecar = make_sidecar({"primary": spec})
    started = time.monotonic()
    with (
        tether.Client(sidecar.addresses[0]) as sdk,
        pytest.raises(tether.DeadlineExceededError),
    ):
        sdk.model("primary", {"model": "x", "messages": HI}, timeout_s=deadline_s)
    assert 0.5 <= time.monotonic() - started < 3.0
    assert len(provider.tried("primary-model")) == 1
    wait_until(lambda: provider.cancelled == 1)


def chat(api: openai.OpenAI) -> Any:
    return api.chat.completions.with_raw_response.create(model="chat", messages=HI)


def gaps(provider: Provider) -> list[float]:
    times = [a.at for a in provider.attempts]
    return [b - a for a, b in itertools.pairwise(times)]


def test_429_with_retry_after_is_retried_after_that_long(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """A 429 saying Retry-After: 0.3 (within backoff_max_s): the same model is asked again no
    sooner than 0.3 s later, and answers."""
    retry = {**FAST_RETRY, "backoff_max_s": 2.0}
    sidecar = pair(make_sidecar, provider, retry=retry)
    limited = provider.model("primary-model").fail("429")
    limited.retry_after_s = 0.3
    raw = chat(client(sidecar))
    assert raw.parse().model == "primary-model" + SNAPSHOT
    assert provider.models_tried() == ["primary-model", "primary-model"]
    assert gaps(provider)[0] >= 0.3


def test_429_beyond_backoff_max_fails_over_at_once(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """A Retry-After longer than backoff_max_s is not waited for: the backup answers now."""
    sidecar = pair(make_sidecar, provider)
    limited = provider.model("primary-model").fail("429")
    limited.retry_after_s = 30
    raw = chat(client(sidecar))
    assert raw.headers["X-Tether-Upstream"] == "backup"
    assert provider.models_tried() == ["primary-model", "backup-model"]
    assert gaps(provider)[0] < 1.0


@pytest.mark.parametrize(
    ("faults", "tried", "answered_by"),
    [
        (["429"] * 10, ["primary-model"] * 3 + ["backup-model"], "backup"),
        (["500"], ["primary-model"] * 2, "primary"),
        (["503"] * 10, ["primary-model"] * 3 + ["backup-model"], "backup"),
        (["reset"], ["primary-model"] * 2, "primary"),
    ],
    ids=["429-persistent", "500-once", "503-persistent", "reset-before-headers"],
)
def test_failures_are_retried_then_fail_over(
    make_sidecar: SidecarFactory,
    provider: Provider,
    faults: list[str],
    tried: list[str],
    answered_by: str,
) -> None:
    """Retryable failures are retried (3 attempts) with backoff, then fail over; each
    request under the model of the upstream that sent it."""
    sidecar = pair(make_sidecar, provider)
    provider.model("primary-model").fail(*faults)
    raw = chat(client(sidecar))
    answer = raw.parse()
    assert answer.choices[0].message.content == answer_text("hi")
    assert raw.headers["X-Tether-Upstream"] == answered_by
    assert raw.headers["X-Tether-Attempts"] == str(len(tried))
    assert provider.models_tried() == tried
    assert all(gap >= 0.0 for gap in gaps(provider))


def test_no_response_at_all_fails_over_after_one_timeout(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """A primary that never answers costs one attempt timeout (0.5 s), not a retry: the
    backup answers."""
    sidecar = pair(make_sidecar, provider, timeout_s=0.5)
    provider.model("primary-model").fail("silent")
    raw = chat(client(sidecar))
    assert raw.headers["X-Tether-Upstream"] == "backup"
    assert provider.models_tried() == ["primary-model", "backup-model"]
    assert 0.5 <= gaps(provider)[0] < 2.0


def test_a_slow_first_token_fails_over(make_sidecar: SidecarFactory, provider: Provider) -> None:
    """A stream whose first token is later than first_chunk_timeout_s: the backup streams."""
    sidecar = pair(make_sidecar, provider, stream={"first_chunk_timeout_s": 0.3})
    slow = provider.model("primary-model").fail("slow_first")
    slow.delay_s = 5.0
    text, models = streamed(client(sidecar))
    assert text == answer_text("hi") and models == {"backup-model" + SNAPSHOT}
    assert provider.models_tried() == ["primary-model", "backup-model"]


def test_a_content_policy_400_reaches_the_caller_untried_elsewhere(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """The provider's content-policy refusal is the caller's to see: not retried, no
    fallback, its code and message unchanged."""
    sidecar = pair(make_sidecar, provider)
    provider.model("primary-model").fail("policy")
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client(sidecar))
    assert caught.value.code == "content_policy_violation"
    assert POLICY_MESSAGE in str(caught.value)
    assert provider.models_tried() == ["primary-model"]


def test_a_primary_down_for_a_window_comes_back(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """The primary is down for 1 s: its breaker opens after 2 failures, the backup serves
    every call meanwhile, a probe closes it after the window, and traffic is back on the
    primary within reset_timeout_s (0.5 s) plus one call."""
    breaker = {"fail_max": 2, "reset_timeout_s": 0.5}
    sidecar = pair(make_sidecar, provider, retry=None, breaker=breaker)
    api = client(sidecar)
    provider.model("primary-model").down_for(1.0)
    back_at = provider.model("primary-model").down_until
    served: list[tuple[float, str]] = []
    while time.monotonic() < back_at + 1.5:
        raw = chat(api)
        served.append((time.monotonic(), raw.headers["X-Tether-Upstream"]))
        time.sleep(0.05)
    failures = [a for a in provider.tried("primary-model") if a.at < back_at]
    assert 2 <= len(failures) <= 4  # fail_max, then a probe each reset_timeout_s
    late = [by for at, by in served if at > back_at + 0.5 + 0.2]
    assert late and set(late) == {"primary"}
    assert served[-1][1] == "primary"


def test_a_stream_that_keeps_delivering_outlives_the_budget(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """A route budget of 0.5 s bounds getting the stream flowing, not a healthy stream: ten
    chunks 0.15 s apart (1.5 s) reach the client whole, from the primary, in one attempt."""
    provider.model("primary-model").chunk_gap_s = 0.15
    upstreams = {"primary": {"kind": "model", "type": "openai", "base_url": provider.base_url,
                             "model": "primary-model"}}  # fmt: skip
    routes = {"chat": {"upstream": "primary", "total_timeout_s": 0.5}}
    sidecar = make_sidecar(upstreams, listen=HTTP, routes=routes)
    started = time.monotonic()
    text, models = streamed(client(sidecar))
    assert text == answer_text("hi") and models == {"primary-model" + SNAPSHOT}
    assert time.monotonic() - started >= 1.0
    assert provider.models_tried() == ["primary-model"]
