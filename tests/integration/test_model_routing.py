"""Model mapping and failover against a provider that knows its model names (a 404 for any
other, answers naming the snapshot that answered): each candidate is asked for its own model,
fallbacks switch models, and one model's breaker never trips another's. The official `openai`
client on the HTTP front, the SDK over gRPC."""

from __future__ import annotations

import threading
from typing import Any

import openai
import pytest

import tether
from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory
from tests.integration.otlp import OtlpReceiver
from tests.integration.provider import FAST_RETRY, HI, SNAPSHOT, Provider, openai_client
from tests.integration.support import LoopThread

HTTP = {"http": "127.0.0.1:0"}
BREAKER = {"fail_max": 2, "reset_timeout_s": 60}


def upstream(provider: Provider, model: str | None = None, **policies: Any) -> dict[str, Any]:
    """An upstream on the provider; `model`: what it is asked for."""
    policies = {"retry": FAST_RETRY, "breaker": None, **policies}
    spec: dict[str, Any] = {"kind": "model", "type": "openai", "base_url": provider.base_url,
                            "policies": policies}  # fmt: skip
    if model is not None:
        spec["model"] = model
    return spec


def client(sidecar: SidecarServer) -> openai.OpenAI:
    return openai_client(sidecar.http_url)


def test_a_fallback_is_asked_for_its_own_model(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """The primary's model fails; the backup upstream gets the request under its model, and
    the answer names the backup's model and carries its usage."""
    provider.model("gpt-4o").fail(*["503"] * 3)
    provider.model("gpt-4o-mini")
    upstreams = {"openai": upstream(provider, "gpt-4o", fallback=["backup"]),
                 "backup": upstream(provider, "gpt-4o-mini")}  # fmt: skip
    sidecar = make_sidecar(upstreams, listen=HTTP, routes={"smart": {"upstream": "openai"}})
    raw = client(sidecar).chat.completions.with_raw_response.create(model="smart", messages=HI)
    answer = raw.parse()
    assert answer.model == "gpt-4o-mini" + SNAPSHOT
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert raw.headers["X-Tether-Upstream"] == "backup"
    assert raw.headers["X-Tether-Attempts"] == "4"
    assert provider.models_tried() == ["gpt-4o"] * 3 + ["gpt-4o-mini"]


def test_route_targets_name_models_on_one_upstream(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """One provider connection serves two models; a route's fallback may be another model on
    the same upstream; streams are rewritten as unary calls are."""
    provider.model("big").fail("503", "503", "503")
    provider.model("small")
    routes = {"assistant": {"upstream": "openai", "model": "big",
                            "fallback": [{"upstream": "openai", "model": "small"}]}}  # fmt: skip
    sidecar = make_sidecar({"openai": upstream(provider)}, listen=HTTP, routes=routes)
    stream = client(sidecar).chat.completions.create(model="assistant", messages=HI, stream=True)
    models = {chunk.model for chunk in stream}
    assert models == {"small" + SNAPSHOT}
    assert provider.models_tried() == ["big"] * 3 + ["small"]


def test_routes_sharing_a_fallback_do_not_trip_each_other(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """Route `a`'s primary always fails and every `a` call is served by the shared backup,
    under the backup's model: the backup's breaker stays closed, and route `c`, whose primary
    is healthy, keeps answering from its primary."""
    provider.model("model-a").fail(*["503"] * 1000)
    provider.model("model-c")
    provider.model("model-b")
    upstreams = {"a": upstream(provider, "model-a", breaker=BREAKER),
                 "c": upstream(provider, "model-c", breaker=BREAKER),
                 "backup": upstream(provider, "model-b", breaker=BREAKER)}  # fmt: skip
    routes = {"a": {"upstream": "a", "fallback": ["backup"]},
              "c": {"upstream": "c", "fallback": ["backup"]}}  # fmt: skip
    sidecar = make_sidecar(upstreams, listen=HTTP, routes=routes)
    api = client(sidecar)
    for _ in range(6):
        assert api.chat.completions.create(model="a", messages=HI).model == "model-b" + SNAPSHOT
        assert api.chat.completions.create(model="c", messages=HI).model == "model-c" + SNAPSHOT
    assert set(provider.models_tried()) == {"model-a", "model-b", "model-c"}
    assert len(provider.tried("model-b")) == 6
    assert all(a.model != "model-a" for a in provider.tried() if a.fault == "")
    with tether.Client(sidecar.addresses[0]) as sdk:
        states = {n: u.breaker_state for n, u in sdk.status().upstreams.items()}
    assert states == {"a": "open", "c": "closed", "backup": "closed"}


def test_one_models_breaker_does_not_trip_another_on_the_same_upstream(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """Routes asking one upstream for two models have a breaker each: `fast` failing opens
    its own (`openai/fast-model`) and `smart` keeps answering."""
    provider.model("fast-model").fail(*["503"] * 1000)
    provider.model("smart-model")
    routes = {"fast": {"upstream": "openai", "model": "fast-model"},
              "smart": {"upstream": "openai", "model": "smart-model"}}  # fmt: skip
    policies = {"breaker": BREAKER, "retry": None}
    sidecar = make_sidecar({"openai": upstream(provider, **policies)}, listen=HTTP, routes=routes)
    api = client(sidecar)
    for _ in range(3):
        with pytest.raises(openai.APIStatusError):
            api.chat.completions.create(model="fast", messages=HI)
    for _ in range(3):
        assert api.chat.completions.create(model="smart", messages=HI).choices[0].message.content
    assert len(provider.tried("fast-model")) == 2  # the third call met the open breaker
    with tether.Client(sidecar.addresses[0]) as sdk:
        states = {n: u.breaker_state for n, u in sdk.status().upstreams.items()}
    assert states["openai/fast-model"] == "open"
    assert states["openai/smart-model"] == "closed"


def test_a_rate_limited_primary_falls_back_to_the_backups_model(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """The primary's own rate limit refuses the second call: the backup takes it, under its
    model; nothing of the refused call reaches the primary."""
    provider.model("primary-model")
    provider.model("backup-model")
    limit = {"requests_per_s": 0.001, "burst": 1, "mode": "reject"}
    upstreams = {"p": upstream(provider, "primary-model", rate_limit=limit, fallback=["b"]),
                 "b": upstream(provider, "backup-model")}  # fmt: skip
    sidecar = make_sidecar(upstreams, listen=HTTP)
    api = client(sidecar)
    assert api.chat.completions.create(model="p", messages=HI).model.startswith("primary-model")
    second = api.chat.completions.with_raw_response.create(model="p", messages=HI)
    assert second.parse().model == "backup-model" + SNAPSHOT
    assert second.headers["X-Tether-Upstream"] == "b"
    assert provider.models_tried() == ["primary-model", "backup-model"]


def test_a_full_bulkhead_falls_back_to_the_backups_model(
    make_sidecar: SidecarFactory, provider: Provider, loop_thread: LoopThread
) -> None:
    """While the primary's one slot is taken (a slow first call) and its queue is zero, a
    second call goes to the backup under the backup's model."""
    slow = provider.model("primary-model").fail("slow_first")
    slow.delay_s = 1.0
    provider.model("backup-model")
    bulkhead = {"max_in_flight": 1, "max_queue": 0, "queue_timeout_s": 0}
    upstreams = {"p": upstream(provider, "primary-model", bulkhead=bulkhead, fallback=["b"]),
                 "b": upstream(provider, "backup-model")}  # fmt: skip
    sidecar = make_sidecar(upstreams, listen=HTTP)
    api = client(sidecar)
    first: list[str] = []
    holder = threading.Thread(
        target=lambda: first.append(api.chat.completions.create(model="p", messages=HI).model)
    )
    holder.start()
    while not provider.tried("primary-model"):
        threading.Event().wait(0.01)
    second = api.chat.completions.with_raw_response.create(model="p", messages=HI)
    holder.join(10)
    assert second.parse().model == "backup-model" + SNAPSHOT
    assert second.headers["X-Tether-Upstream"] == "b"
    assert first == ["primary-model" + SNAPSHOT]
    assert provider.models_tried() == ["primary-model", "backup-model"]


def test_context_overflow_goes_to_the_larger_model_never_resent_unchanged(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """A prompt too long for the primary's model is sent once to it, then to the context
    fallback's larger model, never again to the small one."""
    provider.model("small").context_chars = 100
    provider.model("large")
    routes = {"chat": {"upstream": "openai", "model": "small",
                       "context_fallback": {"upstream": "openai", "model": "large"}}}  # fmt: skip
    sidecar = make_sidecar({"openai": upstream(provider)}, listen=HTTP, routes=routes)
    long = [{"role": "user", "content": "x" * 500}]
    answer = client(sidecar).chat.completions.create(model="chat", messages=long)
    assert answer.model == "large" + SNAPSHOT
    assert provider.models_tried() == ["small", "large"]
    assert [a.prompt_chars for a in provider.tried()] == [500, 500]


def test_grpc_calls_are_sent_under_the_upstreams_model(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """A gRPC `Call` to an upstream with a `model` is sent under that model, whatever the
    payload said; a fallback's model replaces it on the fallback."""
    provider.model("primary-model").fail("503")
    provider.model("backup-model")
    upstreams = {"p": upstream(provider, "primary-model", fallback=["b"], retry=None),
                 "b": upstream(provider, "backup-model")}  # fmt: skip
    sidecar = make_sidecar(upstreams)
    with tether.Client(sidecar.addresses[0]) as sdk:
        result = sdk.model("p", {"model": "anything", "messages": HI})
    assert result.json()["model"] == "backup-model" + SNAPSHOT
    assert result.upstream == "b" and result.attempts == 2
    assert provider.models_tried() == ["primary-model", "backup-model"]


def test_spans_and_cost_name_the_model_asked_for_and_the_one_that_answered(
    make_sidecar: SidecarFactory, provider: Provider, receiver: OtlpReceiver
) -> None:
    """After a fallback: the call's span has the caller's model as `gen_ai.request.model` and
    the fallback's snapshot as `gen_ai.response.model`; each attempt's span names the model it
    asked for; the cost is priced by the model that answered, and labelled with it."""
    provider.model("gpt-4o").fail("503")
    provider.model("gpt-4o-mini")
    upstreams = {"openai": upstream(provider, "gpt-4o", fallback=["backup"], retry=None),
                 "backup": upstream(provider, "gpt-4o-mini")}  # fmt: skip
    prices = {"gpt-4o": {"input_per_1m_usd": 1e6, "output_per_1m_usd": 1e6},
              "gpt-4o-mini": {"input_per_1m_usd": 1.0, "output_per_1m_usd": 1.0}}  # fmt: skip
    sidecar = make_sidecar(upstreams, listen=HTTP, routes={"smart": {"upstream": "openai"}},
                           telemetry={"prices": prices})  # fmt: skip
    answer = client(sidecar).chat.completions.create(model="smart", messages=HI)
    assert answer.usage is not None
    spans = receiver.wait_for(lambda s: any(x.name == "tether.http.chat" for x in s))
    call = next(s for s in spans if s.name == "tether.http.chat")
    assert call.attributes["gen_ai.request.model"] == "smart"
    assert call.attributes["gen_ai.response.model"] == "gpt-4o-mini" + SNAPSHOT
    assert call.attributes["tether.fallback_used"] == "backup"
    attempts = {s.name: s.attributes for s in spans if s.parent_id == call.span_id}
    assert attempts["chat gpt-4o"]["gen_ai.request.model"] == "gpt-4o"
    assert attempts["chat gpt-4o-mini"]["gen_ai.request.model"] == "gpt-4o-mini"
    assert attempts["chat gpt-4o-mini"]["gen_ai.response.model"] == "gpt-4o-mini" + SNAPSHOT
    registry = sidecar.service.telemetry.metrics.registry
    families = [f for f in registry.collect() if f.name == "tether_cost_usd"]
    costs = {s.labels["gen_ai_response_model"]: s.value
             for f in families for s in f.samples if s.name.endswith("_total")}  # fmt: skip
    tokens = answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert costs == {"gpt-4o-mini": pytest.approx(tokens / 1e6)}
