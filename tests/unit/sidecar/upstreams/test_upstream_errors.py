"""How upstream error answers become sidecar errors: context-window overflows are told apart."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar import errors
from sidecar.upstreams._aiohttp import context_exceeded, raise_for_status


def refused(status: int, body: Any, headers: dict[str, str] | None = None) -> errors.SidecarError:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(errors.UpstreamError) as info:
        raise_for_status(status, raw, headers or {}, upstream="llm", secrets=("sk-secret",))
    return info.value


@pytest.mark.parametrize(
    "error",
    [
        {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"},
        {"message": "This model's maximum context length is 8192 tokens.", "code": None},
        {"type": "invalid_request_error", "message": "prompt is too long: 210000 > 200000"},
        {"message": "Input too long: too many input tokens for the context window"},
    ],
)
def test_context_overflows_are_recognised(error: dict[str, Any]) -> None:
    """OpenAI's code, and the messages of OpenAI, Anthropic and open-model servers."""
    exc = refused(400, {"type": "error", "error": error})
    assert isinstance(exc, errors.UpstreamClientError)
    assert exc.context_exceeded
    assert exc.http_status == 400


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"error": {"message": "Rejected by the safety system", "code": "content_filter"}}),
        (400, {"error": "invalid model"}),
        (429, {"error": {"message": "maximum context length reached for your quota"}}),
        (400, b"<html>context length</html>"),
    ],
)
def test_other_refusals_are_not_context_overflows(status: int, body: Any) -> None:
    """Other 400s, a 429 whatever its words, and bodies that are not an error object."""
    exc = refused(status, body)
    assert not getattr(exc, "context_exceeded", False)


def test_context_check_needs_a_client_status() -> None:
    assert not context_exceeded(500, {"code": "context_length_exceeded"})
    assert context_exceeded(413, {"code": "context_length_exceeded"})
