"""How a guarded block's exception is reported (`end_request`): cancelled, transient, status."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from tether._messages import CANCELLED_STATUS, CANCELLED_TYPE, end_request
from tether.v1 import sidecar_pb2 as pb


def reported(exc: BaseException) -> pb.CallError:
    request = end_request("c1", exc, None, None)
    assert request.WhichOneof("outcome") == "error"
    return request.error


@pytest.mark.parametrize(
    "exc", [asyncio.CancelledError(), KeyboardInterrupt(), GeneratorExit(), SystemExit(3)]
)
def test_a_block_that_did_not_finish_is_reported_cancelled(exc: BaseException) -> None:
    """Any BaseException that is not an Exception is `cancelled` (499), never a success."""
    error = reported(exc)
    assert (error.type, error.status, error.retryable) == ("cancelled", 499, False)
    assert (CANCELLED_TYPE, CANCELLED_STATUS) == ("cancelled", 499)
    assert type(exc).__name__ in error.message


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("reset"),
        ConnectionRefusedError("refused"),
        BrokenPipeError("pipe"),
        socket.gaierror("no such host"),
        OSError("network is unreachable"),
        TimeoutError("slow"),
    ],
)
def test_os_errors_and_timeouts_are_transient(exc: BaseException) -> None:
    """OSError (connection and socket errors) and TimeoutError are retryable failures."""
    error = reported(exc)
    assert error.retryable and error.type == type(exc).__name__ and error.status == 0


def _named(name: str, base: type[Exception] = Exception) -> type[Exception]:
    return type(name, (base,), {})


@pytest.mark.parametrize(
    "name",
    [
        "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout",
        "TimeoutException", "TransportError", "NetworkError", "RemoteProtocolError",
        "ServerDisconnectedError", "ClientConnectionError", "ClientOSError",
        "ServerTimeoutError", "ConnectionError", "Timeout", "ChunkedEncodingError",
    ],
)  # fmt: skip
def test_http_client_transport_errors_are_transient_by_name(name: str) -> None:
    """httpx, aiohttp and requests transport errors count, matched by class name."""
    assert reported(_named(name)("boom")).retryable


def test_a_subclass_of_a_transient_name_is_transient() -> None:
    """Any base class in the MRO may carry the name (httpx.ReadError < TransportError)."""
    read_error = _named("ReadError", _named("TransportError"))
    assert reported(read_error("cut")).retryable
    assert not reported(_named("ReadErrorish")("x")).retryable


def test_permanent_errors_are_not_transient() -> None:
    """A ValueError is the call's own fault: not retryable, no status."""
    error = reported(ValueError("bad argument"))
    assert (error.type, error.status, error.retryable) == ("ValueError", 0, False)


def test_retryable_attribute_is_honoured() -> None:
    """An exception saying `retryable = True` is transient whatever its class."""
    exc = ValueError("flaky")
    exc.retryable = True  # type: ignore[attr-defined]
    assert reported(exc).retryable


class _Response:
    def __init__(self, **attrs: Any) -> None:
        self.__dict__.update(attrs)


def _with(**attrs: Any) -> Exception:
    exc = Exception("http error")
    exc.__dict__.update(attrs)
    return exc


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (_with(status_code=503), 503),  # fastapi/starlette HTTPException style
        (_with(status=429), 429),  # aiohttp ClientResponseError
        (_with(response=_Response(status_code=502)), 502),  # httpx, requests
        (_with(response=_Response(status=504)), 504),  # aiohttp response
        (_with(response=None), 0),  # requests without a response
        (_with(status=True), 0),  # a bool is no status
        (_with(status="500"), 0),  # nor is a string
    ],
)
def test_http_status_is_read_from_the_exception_or_its_response(
    exc: Exception, status: int
) -> None:
    """The status comes from `status_code`/`status` on the exception or its `response`."""
    assert reported(exc).status == status


def test_success_carries_payload_and_no_error() -> None:
    """No exception: the result is the payload."""
    request = end_request("c1", None, {"rows": 1}, None)
    assert request.WhichOneof("outcome") != "error" and request.payload == b'{"rows":1}'
