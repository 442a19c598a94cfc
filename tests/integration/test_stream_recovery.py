"""Mid-stream recovery through the HTTP front with the official `openai` client, against a
provider that behaves like OpenAI's API: a stream cut, stalled, broken or failed in-band after
words reached the caller goes on as one whole answer (replayed, or continued by a prefill),
never with a word duplicated, lost or altered; or it ends with the original error."""

from __future__ import annotations

from typing import Any

import openai
import pytest

import tether
from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory
from tests.integration.provider import (
    FAST_RETRY,
    HI,
    SNAPSHOT,
    Provider,
    answer_text,
    openai_client,
)

HTTP = {"http": "127.0.0.1:0"}
WHOLE = answer_text("hi")


def spec(provider: Provider, model: str, **extra: Any) -> dict[str, Any]:
    policies = {"retry": FAST_RETRY, "breaker": None, "stream": {"idle_timeout_s": 0.5},
                **extra.pop("policies", {})}  # fmt: skip
    provider.model(model)
    return {"kind": "model", "type": "openai", "base_url": provider.base_url, "model": model,
            "policies": policies, **extra}  # fmt: skip


def sidecar_with(
    make_sidecar: SidecarFactory,
    provider: Provider,
    backup: dict[str, Any] | None = None,
    **primary: Any,
) -> SidecarServer:
    """Route `chat`: `primary` (model `primary-model`), then `backup` (`backup-model`)."""
    upstreams = {"primary": spec(provider, "primary-model", **primary),
                 "backup": spec(provider, "backup-model", **(backup or {}))}  # fmt: skip
    routes = {"chat": {"upstream": "primary", "fallback": ["backup"]}}
    return make_sidecar(upstreams, listen=HTTP, routes=routes)


def client(sidecar: SidecarServer) -> openai.OpenAI:
    return openai_client(sidecar.http_url)


def read(api: openai.OpenAI, **options: Any) -> tuple[str, list[Any]]:
    """The streamed text (the loop of OpenAI's docs) and every chunk."""
    chunks = list(api.chat.completions.create(model="chat", messages=HI, stream=True, **options))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def recoveries(sidecar: SidecarServer) -> dict[tuple[str, str], float]:
    registry = sidecar.service.telemetry.metrics.registry
    return {(s.labels["upstream"], s.labels["outcome"]): s.value
            for f in registry.collect() if f.name == "tether_stream_recoveries"
            for s in f.samples if s.name.endswith("_total")}  # fmt: skip


@pytest.mark.parametrize("fault", ["cut", "stall", "malformed", "error_event"])
def test_a_broken_stream_is_replayed_on_the_same_upstream(
    make_sidecar: SidecarFactory, provider: Provider, fault: str
) -> None:
    """Two words reached the caller, then the fault: the same upstream is asked again, its
    answer begins with those words, and the caller gets the whole answer exactly once."""
    sidecar = sidecar_with(make_sidecar, provider)
    provider.model("primary-model").fail(fault)
    text, chunks = read(client(sidecar))
    assert text == WHOLE
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert provider.models_tried() == ["primary-model", "primary-model"]
    assert recoveries(sidecar) == {("primary", "replayed"): 1.0}


def test_the_stream_helper_accumulates_one_whole_message(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """The client's own accumulator (`chat.completions.stream`) ends with one message whose
    content is the whole answer, and usage when asked for."""
    sidecar = sidecar_with(make_sidecar, provider)
    provider.model("primary-model").fail("cut")
    with client(sidecar).chat.completions.stream(
        model="chat",
        messages=HI,
        stream_options={"include_usage": True},  # type: ignore[arg-type]
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == WHOLE
    assert final.usage is not None and final.usage.completion_tokens > 0


def test_a_prefill_continues_on_the_fallback(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """The primary cuts twice (its replay too); the backup declares `prefill`: it is asked to
    continue the delivered words under its own model, and streams only the rest."""
    sidecar = sidecar_with(make_sidecar, provider, backup={"continuation": "prefill"})
    provider.model("primary-model").fail("cut", "cut")
    text, chunks = read(client(sidecar))
    assert text == WHOLE
    prefill = provider.tried("backup-model")[0].body["messages"][-1]
    assert prefill["role"] == "assistant" and WHOLE.startswith(prefill["content"])
    assert prefill["content"] and prefill["content"] != WHOLE
    assert {c.model for c in chunks[-3:]} == {"backup-model" + SNAPSHOT}
    assert provider.models_tried() == ["primary-model", "primary-model", "backup-model"]
    assert recoveries(sidecar) == {("backup", "continued"): 1.0}


def test_a_refused_prefill_falls_to_replay(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """A fallback that refuses the prefill with a 400 is asked for a replay instead; the
    400 never reaches the caller."""
    backup = {"continuation": "prefill", "prefill_params": {"continue_final_message": True}}
    sidecar = sidecar_with(make_sidecar, provider, backup=backup, continuation="none")
    provider.model("primary-model").fail("cut")
    provider.model("backup-model").fail("refuse_prefill")
    text, _ = read(client(sidecar))
    assert text == WHOLE
    refused, replayed = provider.tried("backup-model")
    assert refused.body["continue_final_message"] is True
    assert refused.body["messages"][-1]["role"] == "assistant"
    assert replayed.body["messages"] == HI and "continue_final_message" not in replayed.body
    assert recoveries(sidecar) == {("backup", "replayed"): 1.0}


def test_a_replay_that_diverges_ends_with_the_original_error(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """The backup's answer does not begin with the delivered words: nothing of it reaches the
    caller, who gets the delivered words and then the original in-band error."""
    sidecar = sidecar_with(make_sidecar, provider, continuation="none")
    provider.model("primary-model").fail("error_event")
    provider.model("backup-model").text = "A different answer altogether."
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client(sidecar).chat.completions.create(model="chat", messages=HI,
                                                             stream=True):  # fmt: skip
            received.append(chunk.choices[0].delta.content or "")
    assert WHOLE.startswith("".join(received)) and "".join(received)
    assert "failed mid-stream" in str(caught.value)
    assert provider.models_tried() == ["primary-model", "backup-model"]
    assert recoveries(sidecar) == {("backup", "gave_up"): 1.0}  # the last one tried


def test_several_choices_are_not_recovered(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """`n: 2` answers are not recovered: the cut ends the stream, and nobody is asked again."""
    sidecar = sidecar_with(make_sidecar, provider)
    provider.model("primary-model").fail("cut")
    provider.model("primary-model").choices = 2
    with pytest.raises(openai.APIError):
        read(client(sidecar), n=2)
    assert provider.models_tried() == ["primary-model"]
    assert recoveries(sidecar) == {("primary", "refused"): 1.0}


def test_no_recovery_past_the_callers_deadline(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """A stall that outlasts the caller's deadline (X-Tether-Timeout-S): the stream ends with
    the timeout; nothing is asked again."""
    sidecar = sidecar_with(make_sidecar, provider, policies={"stream": {"idle_timeout_s": 5}})
    provider.model("primary-model").fail("stall")
    with pytest.raises(openai.APIError):
        read(client(sidecar), extra_headers={"X-Tether-Timeout-S": "0.5"})
    assert provider.models_tried() == ["primary-model"]


def test_a_grpc_stream_is_recovered_too(make_sidecar: SidecarFactory, provider: Provider) -> None:
    """The SDK's StreamCall goes through the same recovery: the chunks it yields make the
    whole answer once, and the summary names the upstream that finished it."""
    sidecar = sidecar_with(make_sidecar, provider, continuation="none",
                           policies={"fallback": ["backup"]})  # fmt: skip
    provider.model("primary-model").fail("cut")
    with tether.Client(sidecar.addresses[0]) as sdk:
        stream = sdk.stream_model("primary", {"model": "x", "messages": HI})
        chunks = list(stream)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == WHOLE
    assert stream.summary.done and stream.summary.upstream == "backup"
    assert provider.models_tried() == ["primary-model", "backup-model"]


def test_the_journal_keeps_the_recovered_answer_only(
    make_sidecar: SidecarFactory, provider: Provider
) -> None:
    """A journaled stream cut and replayed: the run's replay from the journal gives exactly
    the answer the caller got (the whole answer once), and asks the provider nothing."""
    sidecar = sidecar_with(make_sidecar, provider)
    provider.model("primary-model").fail("cut")
    headers = {"X-Tether-Run-Id": "run-r", "Idempotency-Key": "step-1"}
    first, _ = read(client(sidecar), extra_headers=headers)
    tried = len(provider.attempts)
    raw = client(sidecar).chat.completions.with_raw_response.create(
        model="chat", messages=HI, stream=True, extra_headers=headers
    )
    again = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert first == again == WHOLE
    assert raw.headers["X-Tether-Replayed"] == "true"
    assert len(provider.attempts) == tried == 2
