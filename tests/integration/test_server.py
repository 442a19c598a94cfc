"""The grpc.aio server: socket permissions, health, reflection, address ownership."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import tether
from sidecar.config import parse_config
from sidecar.server import AddressInUseError, SidecarServer, create_server, unix_path
from tests.integration.support import LoopThread, sidecar_config, start_sidecar


def test_unix_socket_is_private(sidecar: SidecarServer, address: str) -> None:
    """The unix socket is created with mode 0600."""
    path = unix_path(address)
    assert path is not None
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_tcp_binds_loopback_port(sidecar: SidecarServer) -> None:
    """Port 0 binds a real loopback port that answers."""
    host, port = sidecar.addresses[1].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    with tether.Client(sidecar.addresses[1]) as client:
        assert client.status().serving


def test_health_serving_then_not_serving(sidecar: SidecarServer, loop_thread: LoopThread) -> None:
    """Health is SERVING for the server and the Sidecar service, NOT_SERVING after drain starts."""
    with grpc.insecure_channel(sidecar.addresses[0]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "tether.v1.Sidecar"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
    loop_thread.run(sidecar._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
    with grpc.insecure_channel(sidecar.addresses[0]) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=2
        )
    assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_lists_services(address: str) -> None:
    """Server reflection lists the Sidecar and health services."""
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        answer = next(stub.ServerReflectionInfo(iter([request]), timeout=2))
    names = {s.name for s in answer.list_services_response.service}
    assert {"tether.v1.Sidecar", "grpc.health.v1.Health"} <= names


def test_stale_socket_file_is_replaced(short_tmp: Path, loop_thread: LoopThread) -> None:
    """A socket file left by a crash (nobody listening) is removed and the sidecar binds."""
    path = short_tmp / "stale.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(path))
    leftover.close()  # the file stays, nobody listens
    config = sidecar_config(str(path), {"m": {"kind": "model", "type": "mock"}})
    server = loop_thread.run(start_sidecar(config))
    try:
        with tether.Client(f"unix:{path}") as client:
            assert client.status().serving
    finally:
        loop_thread.run(server.drain(0))
    assert not path.exists()


def test_live_socket_is_not_stolen(sidecar: SidecarServer, loop_thread: LoopThread) -> None:
    """A second sidecar on the socket of a live one refuses to start."""
    path = unix_path(sidecar.addresses[0])
    config = sidecar_config(str(path), {"m": {"kind": "model", "type": "mock"}})
    with pytest.raises(AddressInUseError):
        loop_thread.run(create_server(config))
    with tether.Client(sidecar.addresses[0]) as client:
        assert client.status().serving


def test_non_socket_file_is_not_replaced(short_tmp: Path, loop_thread: LoopThread) -> None:
    """A regular file at the socket path is kept, and the sidecar refuses to start, naming it."""
    path = short_tmp / "notes.sock"
    path.write_text("precious")
    config = sidecar_config(str(path), {"m": {"kind": "model", "type": "mock"}})
    with pytest.raises(AddressInUseError, match="not a socket") as info:
        loop_thread.run(create_server(config))
    assert str(path) in str(info.value)
    assert path.read_text() == "precious"


def test_busy_tcp_port_is_address_in_use(short_tmp: Path, loop_thread: LoopThread) -> None:
    """A TCP port another socket listens on is AddressInUseError; no socket file is left."""
    path = short_tmp / "t.sock"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        data = {
            "listen": {"grpc": [f"unix:{path}", f"127.0.0.1:{port}"], "metrics": None},
            "upstreams": {"m": {"kind": "model", "type": "mock"}},
        }
        with pytest.raises(AddressInUseError, match=f"cannot listen on 127.0.0.1:{port}: "):
            loop_thread.run(create_server(parse_config(data)))
    assert not path.exists()
