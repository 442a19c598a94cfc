"""Guarded calls (BeginCall/EndCall): the agent's own calls pass the same gates."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import tether
from tests.integration.conftest import SidecarFactory
from tether.v1 import sidecar_pb2 as pb


def guarded(**policies: Any) -> dict[str, Any]:
    return {"kind": "tool", "type": "guarded", "timeout_s": 0.3, "policies": policies}


def test_guarded_success_is_counted(make_sidecar: SidecarFactory) -> None:
    """A guarded block that returns counts one call, no error, and frees its slot."""
    server = make_sidecar({"db": guarded()})
    with tether.Client(server.addresses[0]) as client:
        with client.guard("db", {"sql": "select 1"}) as call:
            assert client.status().upstreams["db"].in_flight == 1
            call.set_result({"rows": 1})
        status = client.status().upstreams["db"]
    assert (status.calls, status.errors, status.in_flight) == (1, 0, 0)


def test_transient_failures_open_the_breaker(make_sidecar: SidecarFactory) -> None:
    """Connection errors in guarded blocks count as failures; at fail_max the breaker opens
    and the next guard is refused before its block runs."""
    server = make_sidecar({"db": guarded(breaker={"fail_max": 2, "reset_timeout_s": 30})})
    ran = 0
    with tether.Client(server.addresses[0]) as client:
        for _ in range(2):
            with pytest.raises(ConnectionError), client.guard("db"):
                ran += 1
                raise ConnectionError("db down")
        with pytest.raises(tether.CircuitOpenError), client.guard("db"):
            ran += 1
        status = client.status().upstreams["db"]
    assert ran == 2
    assert status.breaker_state == "open"
    assert (status.calls, status.errors, status.rejected) == (3, 3, 1)  # a refusal is an error


def test_permanent_errors_do_not_trip_the_breaker(make_sidecar: SidecarFactory) -> None:
    """An error the dependency did not cause (ValueError) is an error, not an outage."""
    server = make_sidecar({"db": guarded(breaker={"fail_max": 1, "reset_timeout_s": 30})})
    with tether.Client(server.addresses[0]) as client:
        for _ in range(3):
            with pytest.raises(ValueError), client.guard("db"):
                raise ValueError("bad argument")
        status = client.status().upstreams["db"]
    assert status.breaker_state == "closed" and status.errors == 3


def test_guarded_bulkhead(make_sidecar: SidecarFactory) -> None:
    """The bulkhead bounds guarded calls too: a second concurrent guard is refused at once."""
    server = make_sidecar({"db": guarded(bulkhead={"max_in_flight": 1, "max_queue": 0})})
    with tether.Client(server.addresses[0]) as client:
        with client.guard("db"), pytest.raises(tether.OverloadedError), client.guard("db"):
            pass
        with client.guard("db"):
            pass  # the slot came back


async def test_async_guard(make_sidecar: SidecarFactory) -> None:
    """The asyncio client guards calls the same way."""
    server = make_sidecar({"db": guarded()})
    async with tether.AsyncClient(server.addresses[0]) as client:
        async with client.guard("db", {"q": 1}) as call:
            call.set_result([1, 2])
        assert (await client.status()).upstreams["db"].calls == 1


def test_abandoned_guard_is_released_by_its_lease(make_sidecar: SidecarFactory) -> None:
    """A BeginCall whose EndCall never comes frees its slot after the upstream's timeout."""
    server = make_sidecar({"db": guarded(bulkhead={"max_in_flight": 1, "max_queue": 0})})
    with tether.Client(server.addresses[0]) as client:
        stub = client._stub
        begun = stub.BeginCall(pb.BeginCallRequest(upstream="db"))
        assert client.status().upstreams["db"].in_flight == 1
        time.sleep(0.4)
        assert client.status().upstreams["db"].in_flight == 0
        with client.guard("db"):
            pass
        with pytest.raises(Exception) as info:
            stub.EndCall(pb.EndCallRequest(call_id=begun.call_id, payload=b"{}"))
    err = tether._errors.from_rpc_error(info.value)  # type: ignore[arg-type]
    assert isinstance(err, tether.InvalidRequestError) and err.metadata["field"] == "call_id"


def test_call_to_guarded_upstream_is_invalid(make_sidecar: SidecarFactory) -> None:
    """A guarded upstream has no transport: Call to it is INVALID_ARGUMENT."""
    server = make_sidecar({"db": guarded()})
    with tether.Client(server.addresses[0]) as client, pytest.raises(tether.InvalidRequestError):
        client.tool("db", {})


async def test_cancelled_guard_leaves_the_failure_count(make_sidecar: SidecarFactory) -> None:
    """A guarded block cancelled (CancelledError) is neither a success nor a failure: the
    breaker keeps its one failure."""
    server = make_sidecar({"db": guarded(breaker={"fail_max": 3, "reset_timeout_s": 30})})
    async with tether.AsyncClient(server.addresses[0]) as client:
        with pytest.raises(ConnectionError):
            async with client.guard("db"):
                raise ConnectionError("db down")
        with pytest.raises(asyncio.CancelledError):
            async with client.guard("db"):
                raise asyncio.CancelledError
        status = (await client.status()).upstreams["db"]
    assert status.gauges["breaker.failures"] == 1 and status.in_flight == 0


def test_breaker_refused_guard_frees_its_gates(make_sidecar: SidecarFactory) -> None:
    """A guard refused by the open breaker leaves nothing in flight, its bulkhead slot free
    and its token reservation refunded."""
    policies = {
        "breaker": {"fail_max": 1, "reset_timeout_s": 30},
        "bulkhead": {"max_in_flight": 1, "max_queue": 0},
        "rate_limit": {"tokens_per_min": 1000, "mode": "reject"},
    }
    server = make_sidecar({"llm": {"kind": "model", "type": "guarded", "policies": policies}})
    big = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 200}
    with tether.Client(server.addresses[0]) as client:
        with pytest.raises(ConnectionError), client.guard("llm", kind="model"):
            raise ConnectionError("down")  # no payload: no tokens; trips the breaker
        for _ in range(5):  # ~301 tokens each: kept, they would exhaust the 1000
            with pytest.raises(tether.CircuitOpenError), client.guard("llm", big, kind="model"):
                pass
        status = client.status().upstreams["llm"]
    assert status.in_flight == 0 and status.gauges["bulkhead.in_flight"] == 0
    assert status.gauges["rate_limit.tokens_available"] >= 999
    assert status.gauges["breaker.rejected"] == 5
