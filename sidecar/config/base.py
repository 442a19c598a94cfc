"""What every part of the configuration shares: strict frozen models, defaults, addresses."""

from __future__ import annotations

import ipaddress
import re

from pydantic import BaseModel, ConfigDict

DEFAULT_GRPC_ADDRESS = "unix:tether.sock"
DEFAULT_METRICS_ADDRESS = "127.0.0.1:9464"
DEFAULT_MAX_PAYLOAD_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_CONCURRENT_RPCS = 1024
DEFAULT_GRACE_S = 10.0
DEFAULT_TIMEOUT_S = 60.0
# a call's whole budget: a silent upstream with no fallback costs one attempt and the one
# retry of a timeout (2 x 60 s), never minutes more
DEFAULT_TOTAL_TIMEOUT_S = 120.0
DEFAULT_JOURNAL_PATH = "tether-journal.db"
DEFAULT_MAX_ENTRY_BYTES = 1024 * 1024
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an RFC 9110 token


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host_port(address: str) -> tuple[str, int]:
    """`host:port` (IPv6 in brackets) into its parts; ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port or unix:PATH, got {address!r}")
    return host, int(port)
