"""The failover matrix: each fault of a provider that behaves like OpenAI's API, what the
caller (the official `openai` client on the HTTP front) sees, and exactly what the provider
logged: attempts per model and the gaps between them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory
from tests.integration.provider import SNAPSHOT, Provider, answer_text
from tests.integration.support import LoopThread

HTTP = {"http": "127.0.0.1:0"}
HI = [{"role": "user", "content": "hi"}]
FAST_RETRY = {"max_attempts": 3, "backoff_initial_s": 0.01, "backoff_max_s": 0.05,
              "budget_min_retries": 100}  # fmt: skip


@pytest.fixture
def provider(loop_thread: LoopThread) -> Iterator[Provider]:
    server = Provider()
    loop_thread.run(server.start())
    yield server
    loop_thread.run(server.stop())


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
    assert sidecar.http_url is not None
    return openai.OpenAI(base_url=f"{sidecar.http_url}/v1", api_key="unused", max_retries=0)


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
