"""Journal semantics through a real sidecar and a real SQLite file: streams, errors, guards."""

from __future__ import annotations

from typing import Any

import pytest

import tether
from tests.integration.conftest import SidecarFactory
from tests.integration.faults import FaultServer

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}


def mock(**extra: Any) -> dict[str, Any]:
    return {"kind": "model", "type": "mock", "policies": {"retry": None}, **extra}


def test_stream_replays_its_chunks(make_sidecar: SidecarFactory) -> None:
    """A journaled stream replays the same chunks, marked replayed, without a new hit."""
    server = make_sidecar({"m": mock()})
    with tether.Client(server.addresses[0]) as client:
        first = client.stream_model("m", CHAT, run_id="s", idempotency_key="k")
        live = list(first)
        again = client.stream_model("m", CHAT, run_id="s", idempotency_key="k")
        replayed = list(again)
        hits = client.status().upstreams["m"].hits
    assert replayed == live and hits == 1
    assert again.summary.replayed and not first.summary.replayed
    assert again.summary.usage == first.summary.usage and again.summary.upstream == "m"


def test_unary_and_stream_with_one_key_disagree(make_sidecar: SidecarFactory) -> None:
    """A key journaled by a unary call cannot be replayed as a stream (another request)."""
    server = make_sidecar({"m": mock()})
    with tether.Client(server.addresses[0]) as client:
        client.model("m", CHAT, run_id="s", idempotency_key="k")
        with pytest.raises(tether.NonDeterministicReplayError):
            list(client.stream_model("m", CHAT, run_id="s", idempotency_key="k"))


def test_permanent_error_is_replayed(make_sidecar: SidecarFactory, faults: FaultServer) -> None:
    """A 400 is journaled and answered again from the journal, same status, no new hit."""
    url = faults.base_url("bad")
    faults.endpoint("bad").fail_status = 400
    server = make_sidecar({"u": {"kind": "model", "type": "openai", "base_url": url}})
    with tether.Client(server.addresses[0]) as client:
        errors = []
        for _ in range(2):
            with pytest.raises(tether.UpstreamClientError) as info:
                client.model("u", CHAT, run_id="e", idempotency_key="k")
            errors.append(info.value)
    assert faults.endpoint("bad").hits == 1
    assert errors[1].http_status == 400 and errors[1].message == errors[0].message
    assert errors[1].metadata.get("replayed") == "true"


def test_transient_error_runs_again(make_sidecar: SidecarFactory, faults: FaultServer) -> None:
    """A 503 is journaled as retryable: the replay calls the upstream again and succeeds."""
    url = faults.base_url("flaky")
    faults.endpoint("flaky").fail_next = 1
    upstream = {"kind": "model", "type": "openai", "base_url": url, "policies": {"retry": None}}
    server = make_sidecar({"u": upstream})
    with tether.Client(server.addresses[0]) as client:
        with pytest.raises(tether.UpstreamUnavailableError):
            client.model("u", CHAT, run_id="t", idempotency_key="k")
        answer = client.model("u", CHAT, run_id="t", idempotency_key="k")
        again = client.model("u", CHAT, run_id="t", idempotency_key="k")
    assert faults.endpoint("flaky").hits == 2
    assert not answer.replayed and again.replayed and again.payload == answer.payload


def test_too_large_answer_is_returned_not_kept(make_sidecar: SidecarFactory) -> None:
    """An answer over max_entry_bytes is returned, counted, and re-executed on replay
    (the model upstream is idempotent)."""
    server = make_sidecar({"m": mock()}, journal={"max_entry_bytes": 100})
    path = server.service.config.journal.path
    assert path.endswith(".journal.db")
    with tether.Client(server.addresses[0]) as client:
        first = client.model("m", CHAT, run_id="big", idempotency_key="k")
        second = client.model("m", CHAT, run_id="big", idempotency_key="k")
        entries = client.journal("big")
        status = client.status()
    assert len(first.payload) > 100 and not second.replayed
    assert first.json()["hit"] == 1 and second.json()["hit"] == 2
    assert entries[0].too_large
    assert status.upstreams["m"].hits == 2


def test_guarded_call_is_replayed(make_sidecar: SidecarFactory) -> None:
    """A guarded call's result is journaled; the same guard again returns it without running
    the block."""
    server = make_sidecar({"db": {"kind": "tool", "type": "guarded"}})
    ran = 0
    with tether.Client(server.addresses[0]) as client:
        for _ in range(2):
            run = client.run("g")
            with run.guard("db", {"sql": "insert"}) as call:
                if call.replayed:
                    result = call.result
                else:
                    ran += 1
                    call.set_result({"rows": 1})
                    result = {"rows": 1}
            assert result == {"rows": 1}
    assert ran == 1


def test_calls_without_run_are_not_journaled(make_sidecar: SidecarFactory) -> None:
    """Only calls with a run id and a key are journaled; others always reach the upstream."""
    server = make_sidecar({"m": mock()})
    with tether.Client(server.addresses[0]) as client:
        a = client.model("m", CHAT, idempotency_key="k")
        b = client.model("m", CHAT, idempotency_key="k")
        assert client.runs() == []
    assert (a.json()["hit"], b.json()["hit"]) == (1, 2)
