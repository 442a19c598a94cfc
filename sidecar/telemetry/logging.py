"""Logs: JSON lines (or text) on stderr, each tied to its trace, repetition rate-limited.

Every line carries `trace_id` and `span_id` of the span current when it was logged, and
`run_id` when the call belongs to a run (`current_run`, set while a call is handled), so a
log line leads to its trace; a record may bring its own in `extra={"ids": {...}}`.
Structured fields travel in `extra={"fields": {...}}`. A message (as formatted) logged more
than `burst` times in `window_s` seconds is suppressed until the window ends, then one line
says how many were dropped; the one line per finished call (fields with `"event": "call"`)
is never suppressed, nor are Tether's own errors. OpenTelemetry's log records (export
failures, retries) go through the same handler, at warning level and up.
Payloads, prompts and secrets are never passed to the logger.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from opentelemetry import trace

DEFAULT_LEVEL = "INFO"
LEVEL_ENV = "TETHER_LOG_LEVEL"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OTEL_LEVEL = logging.WARNING

current_run: contextvars.ContextVar[str] = contextvars.ContextVar("tether_run_id", default="")


def _ids() -> dict[str, str]:
    context = trace.get_current_span().get_span_context()
    ids = {}
    if context.is_valid:
        ids["trace_id"] = format(context.trace_id, "032x")
        ids["span_id"] = format(context.span_id, "016x")
    run_id = current_run.get()
    if run_id:
        ids["run_id"] = run_id
    return ids


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "ids", None) or {})
        line.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines, with the structured fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        pairs = {**(getattr(record, "ids", None) or {}), **(getattr(record, "fields", None) or {})}
        return text + "".join(f" {k}={v}" for k, v in pairs.items())


class Context(logging.Filter):
    """Stamps each record with the current trace, span and run (unless it brings its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "ids", None) is None:
            record.ids = _ids()
        return True


def _exempt(record: logging.LogRecord) -> bool:
    """Never rate-limited: Tether's errors, and the one line per finished call."""
    if record.levelno >= logging.ERROR and record.name.startswith("tether"):
        return True
    fields = getattr(record, "fields", None)
    return isinstance(fields, dict) and fields.get("event") == "call"


class RateLimit(logging.Filter):
    """At most `burst` records per message (as formatted) in each `window_s` window."""

    def __init__(self, burst: int = 10, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._seen: dict[tuple[str, str], list[float]] = {}  # key -> [window start, count]
        self._lock = threading.Lock()  # OpenTelemetry logs from its export thread

    def filter(self, record: logging.LogRecord) -> bool:
        if _exempt(record):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the handler report it
            return True
        key = (record.name, message)
        now = time.monotonic()
        with self._lock:
            start, count = self._seen.get(key, (now, 0.0))
            if now - start >= self.window_s:
                self._seen[key] = [now, 1.0]
            else:
                self._seen[key] = [start, count + 1]
                if len(self._seen) > 10_000:
                    self._seen.clear()
                return count < self.burst
        if count > self.burst:
            record.msg = f"{record.msg} [{int(count - self.burst)} similar lines suppressed]"
        return True


def setup_logging(level: str | None = None, fmt: str = "json") -> None:
    """Level from the argument, else $TETHER_LOG_LEVEL, else INFO; JSON or text lines."""
    chosen = (level or os.environ.get(LEVEL_ENV) or DEFAULT_LEVEL).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(Context())
    handler.addFilter(RateLimit())
    root = logging.getLogger("tether")
    root.handlers[:] = [handler]
    root.setLevel(chosen)
    root.propagate = False
    # OpenTelemetry's own records (an export failing, being retried) in the same format.
    otel = logging.getLogger("opentelemetry")
    otel.handlers[:] = [handler]
    otel.setLevel(OTEL_LEVEL)
    otel.propagate = False
