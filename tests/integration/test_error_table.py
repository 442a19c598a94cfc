"""Each row of the error table, through the SDK, as the right exception with its details."""

from __future__ import annotations

import time

import grpc
import pytest

import tether
from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory, standard_upstreams
from tests.integration.support import LoopThread, UpstreamApp

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
MIB = 1024 * 1024


def chat_of(size: int) -> dict[str, object]:
    """A chat payload of about `size` bytes."""
    return {"model": "m", "messages": [{"role": "user", "content": "x" * size}]}


def call(address: str, upstream: str, payload: object = CHAT, **kw: object) -> tether.Result:
    with tether.Client(address) as client:
        return client.model(upstream, payload, **kw)  # type: ignore[arg-type]


def test_unknown_upstream_is_not_found(address: str) -> None:
    """An unknown upstream is NOT_FOUND with reason UNKNOWN_UPSTREAM naming it."""
    with pytest.raises(tether.UnknownUpstreamError) as info:
        call(address, "nope")
    err = info.value
    assert (err.code, err.reason, err.upstream) == (
        grpc.StatusCode.NOT_FOUND,
        "UNKNOWN_UPSTREAM",
        "nope",
    )
    assert "llm" in err.message  # lists what is configured


def test_payload_not_json_is_invalid_argument(address: str, upstream: UpstreamApp) -> None:
    """A payload that is not JSON is INVALID_ARGUMENT naming the field; nothing is sent."""
    with pytest.raises(tether.InvalidRequestError) as info:
        call(address, "llm", b"{not json")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.metadata["field"] == "payload"
    assert upstream.seen == []


def test_wrong_kind_is_invalid_argument(address: str) -> None:
    """A tool call to a model upstream is INVALID_ARGUMENT on field kind."""
    with tether.Client(address) as client, pytest.raises(tether.InvalidRequestError) as info:
        client.tool("llm", {"q": 1})
    assert info.value.metadata["field"] == "kind"


def test_model_payload_without_messages_is_invalid(address: str) -> None:
    """A chat payload without messages is INVALID_ARGUMENT on payload.messages."""
    with pytest.raises(tether.InvalidRequestError) as info:
        call(address, "llm", {"model": "m"})
    assert info.value.metadata["field"] == "payload.messages"


def test_payload_over_limit_is_resource_exhausted(
    make_sidecar: SidecarFactory, upstream: UpstreamApp
) -> None:
    """A payload over limits.max_payload_bytes is RESOURCE_EXHAUSTED with sizes; not sent."""
    server = make_sidecar(standard_upstreams(upstream.url), limits={"max_payload_bytes": 1024})
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]}
    with pytest.raises(tether.PayloadTooLargeError) as info:
        call(server.addresses[0], "llm", big)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.metadata["limit_bytes"] == "1024"
    assert upstream.seen == []


def test_payload_up_to_twice_the_limit_has_details(
    make_sidecar: SidecarFactory, upstream: UpstreamApp
) -> None:
    """A payload well over the limit (up to twice it) is refused by the sidecar with its sizes."""
    limit = 2 * MIB
    server = make_sidecar(standard_upstreams(upstream.url), limits={"max_payload_bytes": limit})
    with pytest.raises(tether.PayloadTooLargeError) as info:
        call(server.addresses[0], "llm", chat_of(4 * MIB))
    assert info.value.reason == "PAYLOAD_TOO_LARGE"
    assert info.value.metadata["limit_bytes"] == str(limit)
    assert upstream.seen == []


def test_payload_over_twice_the_limit_is_too_large(
    make_sidecar: SidecarFactory, upstream: UpstreamApp
) -> None:
    """A payload over twice the limit, refused by gRPC itself, is still PayloadTooLargeError."""
    server = make_sidecar(standard_upstreams(upstream.url), limits={"max_payload_bytes": MIB})
    with pytest.raises(tether.PayloadTooLargeError) as info:
        call(server.addresses[0], "llm", chat_of(4 * MIB))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert upstream.seen == []


def test_client_max_message_bytes_bounds_sends(address: str, upstream: UpstreamApp) -> None:
    """Client(max_message_bytes=N) refuses to send a larger message; nothing reaches upstream."""
    with tether.Client(address, max_message_bytes=1024) as client:
        assert client.model("llm", CHAT).json()["object"] == "chat.completion"
        with pytest.raises(tether.PayloadTooLargeError):
            client.model("llm", chat_of(2000))
    assert len(upstream.seen) == 1


async def test_async_client_max_message_bytes_bounds_sends(
    address: str, upstream: UpstreamApp
) -> None:
    """AsyncClient(max_message_bytes=N) refuses to send a larger message too."""
    async with tether.AsyncClient(address, max_message_bytes=1024) as client:
        with pytest.raises(tether.PayloadTooLargeError):
            await client.model("llm", chat_of(2000))
    assert upstream.seen == []


@pytest.mark.parametrize(
    ("target", "payload", "field"),
    [
        ("mock", {"model": "m", "messages": ["hi"]}, "payload.messages"),
        ("mock", {**CHAT, "tools": [{"function": "x"}]}, "payload.tools"),
        ("llm", {"model": "m", "messages": ["hi"]}, "payload.messages"),
    ],
)
def test_malformed_chat_shapes_are_invalid_argument(
    address: str, upstream: UpstreamApp, target: str, payload: object, field: str
) -> None:
    """A chat payload of the wrong shape is INVALID_ARGUMENT naming its field, never INTERNAL."""
    with pytest.raises(tether.InvalidRequestError) as info:
        call(address, target, payload)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.metadata["field"] == field
    assert upstream.seen == []


def test_upstream_timeout_is_deadline_exceeded(address: str, upstream: UpstreamApp) -> None:
    """An upstream slower than its timeout_s is DEADLINE_EXCEEDED, and the request is cancelled."""
    with tether.Client(address) as client, pytest.raises(tether.UpstreamTimeoutError) as info:
        client.tool("hang-tool", {})
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert info.value.upstream == "hang-tool"
    assert upstream.cancelled.wait(2)


def test_upstream_5xx_is_unavailable_with_status(address: str) -> None:
    """An upstream 503 is UNAVAILABLE with the HTTP status in ErrorInfo."""
    with pytest.raises(tether.UpstreamUnavailableError) as info:
        call(address, "broken")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert (info.value.http_status, info.value.upstream) == (503, "broken")


def test_upstream_reset_is_unavailable(address: str) -> None:
    """A connection reset by the upstream is UNAVAILABLE."""
    with pytest.raises(tether.UpstreamUnavailableError) as info:
        call(address, "reset")
    assert info.value.reason == "UPSTREAM_UNAVAILABLE"


def test_upstream_garbage_is_bad_response(address: str) -> None:
    """A 200 whose body is not JSON is UNAVAILABLE with reason UPSTREAM_BAD_RESPONSE."""
    with pytest.raises(tether.UpstreamBadResponseError) as info:
        call(address, "garbage")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_upstream_4xx_passes_status_and_reason(address: str) -> None:
    """An upstream 400 keeps its HTTP status and the provider's message."""
    with pytest.raises(tether.UpstreamClientError) as info:
        call(address, "bad-request")
    err = info.value
    assert (err.code, err.http_status) == (grpc.StatusCode.INVALID_ARGUMENT, 400)
    assert "provider says 400" in err.message and "provider says 400" in err.body


def test_upstream_429_carries_retry_after(address: str) -> None:
    """An upstream 429 with Retry-After: 3 arrives with RetryInfo of 3 s."""
    with pytest.raises(tether.UpstreamClientError) as info:
        call(address, "limited")
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (info.value.http_status, info.value.retry_after_s) == (429, 3.0)


def test_caller_deadline_cuts_hanging_upstream(address: str, upstream: UpstreamApp) -> None:
    """A caller deadline shorter than a hanging upstream: DEADLINE_EXCEEDED within +100 ms,
    and the upstream request is cancelled."""
    with tether.Client(address) as client:
        client.status()  # connect first: the deadline measures the call, not the dial
        start = time.monotonic()
        with pytest.raises(tether.DeadlineExceededError):
            client.model("hang-llm", CHAT, timeout_s=0.3)
        elapsed = time.monotonic() - start
    assert 0.29 <= elapsed < 0.4, elapsed
    assert upstream.cancelled.wait(2), "the upstream never saw the request cancelled"


async def test_async_caller_deadline(address: str, upstream: UpstreamApp) -> None:
    """The asyncio client's deadline cancels the upstream request too."""
    async with tether.AsyncClient(address) as client:
        with pytest.raises(tether.DeadlineExceededError):
            await client.model("hang-llm", CHAT, timeout_s=0.2)
    assert upstream.cancelled.wait(2)


def test_stream_errors_are_typed(address: str) -> None:
    """A failing streamed call raises the same typed error as a unary one."""
    with tether.Client(address) as client, pytest.raises(tether.UpstreamUnavailableError):
        list(client.stream_model("broken", CHAT))


def test_stream_to_non_streaming_upstream_is_invalid(address: str) -> None:
    """StreamCall to a tool upstream is INVALID_ARGUMENT."""
    with tether.Client(address) as client, pytest.raises(tether.InvalidRequestError):
        list(client.stream_model("search", {"q": 1}))


def test_journal_rpcs_without_journal_are_unimplemented(
    make_sidecar: SidecarFactory, upstream: UpstreamApp
) -> None:
    """With `journal.backend: none`, checkpoint RPCs answer UNIMPLEMENTED (NotSupportedError)."""
    from tether.v1 import sidecar_pb2 as pb
    from tether.v1 import sidecar_pb2_grpc as pb_grpc

    server = make_sidecar(standard_upstreams(upstream.url), journal={"backend": "none"})
    with grpc.insecure_channel(server.addresses[0]) as channel:
        stub = pb_grpc.SidecarStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.SaveCheckpoint(pb.SaveCheckpointRequest(run_id="r"))
    err = tether._errors.from_rpc_error(info.value)
    assert isinstance(err, tether.NotSupportedError)
    assert err.code == grpc.StatusCode.UNIMPLEMENTED


def test_draining_sidecar_refuses_new_calls(sidecar: SidecarServer, address: str) -> None:
    """While draining, a new call is UNAVAILABLE with reason DRAINING; status still answers."""
    sidecar.guard.draining = True
    with tether.Client(address) as client:
        with pytest.raises(tether.DrainingError) as info:
            client.model("mock", CHAT)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert client.status().upstreams["mock"].calls == 0


def test_unreachable_sidecar_is_unavailable(short_tmp: object) -> None:
    """No sidecar at the address: SidecarUnavailableError, promptly."""
    client = tether.Client(f"unix:{short_tmp}/absent.sock")
    with client, pytest.raises(tether.SidecarUnavailableError):
        client.model("llm", CHAT, timeout_s=2)


def test_bearer_token_required_when_configured(
    make_sidecar: SidecarFactory,
    upstream: UpstreamApp,
    monkeypatch: pytest.MonkeyPatch,
    loop_thread: LoopThread,
) -> None:
    """With auth.token_env set, calls without the token are UNAUTHENTICATED; with it they pass."""
    monkeypatch.setenv("TT_TOKEN", "s3cret-token")
    server = make_sidecar(standard_upstreams(upstream.url), auth={"token_env": "TT_TOKEN"})
    addr = server.addresses[0]
    with tether.Client(addr) as client, pytest.raises(tether.UnauthenticatedError) as info:
        client.model("mock", CHAT)
    assert "s3cret" not in info.value.message
    with tether.Client(addr, token="wrong") as client, pytest.raises(tether.UnauthenticatedError):
        client.model("mock", CHAT)
    with tether.Client(addr, token="s3cret-token") as client:
        assert client.model("mock", CHAT).json()["hit"] == 1
    monkeypatch.setenv("TETHER_TOKEN", "s3cret-token")
    with tether.Client(addr) as client:
        assert client.model("mock", CHAT).json()["hit"] == 2
