"""Logging set-up for the sidecar process: one line per event, to stderr, no secrets."""

from __future__ import annotations

import logging
import os
import sys

DEFAULT_LEVEL = "INFO"
LEVEL_ENV = "TETHER_LOG_LEVEL"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Level from the argument, else $TETHER_LOG_LEVEL, else INFO."""
    chosen = (level or os.environ.get(LEVEL_ENV) or DEFAULT_LEVEL).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger("tether")
    root.handlers[:] = [handler]
    root.setLevel(chosen)
    root.propagate = False
