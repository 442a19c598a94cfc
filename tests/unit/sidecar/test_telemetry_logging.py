"""Log lines: OpenTelemetry's records in the same JSON format, one line for every call,
rate limiting by the formatted message, the run id on lines logged during a call."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from sidecar.telemetry.logging import RateLimit, current_run, setup_logging


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    """The loggers setup_logging touches, restored afterwards."""
    saved = {}
    for name in ("tether", "opentelemetry"):
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.level, logger.propagate)
    yield
    for name, (handlers, level, propagate) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def setup(level: str) -> io.StringIO:
    """setup_logging, its stderr handler writing to a buffer instead."""
    setup_logging(level)
    buffer = io.StringIO()
    handler = logging.getLogger("tether").handlers[0]
    assert isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr
    handler.setStream(buffer)
    return buffer


def lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


@pytest.mark.usefixtures("restore_loggers")
def test_opentelemetry_records_are_json_lines() -> None:
    """An exporter's retry warning and its failure with a traceback are JSON lines like
    ours; its info chatter is not logged."""
    stderr = setup("DEBUG")
    exporter = logging.getLogger("opentelemetry.exporter.otlp.proto.grpc.exporter")
    exporter.info("connecting")
    exporter.warning("Transient error %s encountered while exporting traces, retrying", "X")
    try:
        raise ConnectionError("refused")
    except ConnectionError:
        exporter.exception("Failed to export traces")
    found = lines(stderr)
    assert [(line["level"], line["logger"]) for line in found] == [
        ("warning", exporter.name),
        ("error", exporter.name),
    ]
    assert "ConnectionError: refused" in found[1]["exception"]


def record(msg: str, *args: Any, name: str = "tether.x", level: int = logging.INFO,
           fields: dict[str, Any] | None = None) -> logging.LogRecord:  # fmt: skip
    rec = logging.LogRecord(name, level, __file__, 1, msg, args, None)
    if fields is not None:
        rec.fields = fields
    return rec


def test_every_call_line_passes() -> None:
    """54 calls: 54 lines, whatever the burst."""
    limit = RateLimit(burst=10, window_s=60)
    passed = [limit.filter(record("call finished", fields={"event": "call"})) for _ in range(54)]
    assert all(passed)


def test_rate_limit_keys_on_the_formatted_message() -> None:
    """Different messages from one template pass; one message repeated is cut at the burst."""
    limit = RateLimit(burst=10, window_s=60)
    assert all(limit.filter(record("breaker of %r opened", f"up{i}")) for i in range(20))
    same = [limit.filter(record("breaker of %r opened", "up0")) for _ in range(20)]
    assert sum(same) == 9  # one of the burst already used above


def test_errors_exempt_for_tether_only() -> None:
    limit = RateLimit(burst=2, window_s=60)
    assert all(limit.filter(record("boom", level=logging.ERROR)) for _ in range(5))
    otel = [limit.filter(record("export failed", name="opentelemetry.x", level=logging.ERROR))
            for _ in range(5)]  # fmt: skip
    assert sum(otel) == 2


@pytest.mark.usefixtures("restore_loggers")
def test_run_id_on_lines_logged_during_a_call() -> None:
    stderr = setup("INFO")
    log = logging.getLogger("tether.sidecar.test")
    token = current_run.set("run-7")
    try:
        log.info("inside")
    finally:
        current_run.reset(token)
    log.info("outside")
    inside, outside = lines(stderr)
    assert inside["run_id"] == "run-7" and "run_id" not in outside
