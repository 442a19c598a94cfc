"""Logs now; traces and metrics arrive with the observability issue."""
