"""Payload shape checks shared by the adapters that take OpenAI-style chat payloads."""

from __future__ import annotations

from typing import Any

from sidecar.errors import InvalidRequestError


def check_messages(messages: Any) -> None:
    """InvalidRequestError (field `payload.messages`) unless `messages` is a list of objects."""
    if not isinstance(messages, list):
        raise InvalidRequestError(
            "payload.messages must be a list of messages", field="payload.messages"
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(
                f"payload.messages[{i}] must be a JSON object, got {type(message).__name__}",
                field="payload.messages",
            )
