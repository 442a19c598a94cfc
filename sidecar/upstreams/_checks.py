"""Payload shape checks shared by the adapters (and the mock) that take chat payloads."""

from __future__ import annotations

from typing import Any

from sidecar.errors import InvalidRequestError


def wants_usage(body: Any) -> bool:
    """Whether a chat stream's caller asked for the usage chunk
    (`stream_options.include_usage: true`)."""
    options = body.get("stream_options") if isinstance(body, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


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


def check_anthropic_messages(body: Any) -> None:
    """InvalidRequestError unless `body` is an Anthropic Messages request: an object with a
    list of message objects, a positive integer `max_tokens`, and a string or list `system`
    when present."""
    if not isinstance(body, dict):
        raise InvalidRequestError("payload must be a JSON object", field="payload")
    check_messages(body.get("messages"))
    max_tokens = body.get("max_tokens")
    if type(max_tokens) is not int or max_tokens < 1:
        raise InvalidRequestError(
            "payload.max_tokens must be a positive integer (Anthropic requires it)",
            field="payload.max_tokens",
        )
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise InvalidRequestError(
            "payload.system must be a string or a list of content blocks", field="payload.system"
        )
