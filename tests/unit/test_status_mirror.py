"""The sidecar's status table and the SDK's error table stay mirrors of each other."""

from __future__ import annotations

import grpc

import tether
from sidecar import errors, status
from tether import _errors


def test_every_sidecar_reason_has_an_sdk_class_of_the_same_name() -> None:
    """Each row of sidecar.status.TABLE maps, by reason, to the SDK class of the same name."""
    for cls, (_code, reason) in status.TABLE.items():
        sdk_cls = _errors.BY_REASON[reason]
        assert sdk_cls.__name__ == cls.__name__, reason


def test_sdk_has_no_reason_the_sidecar_never_sends() -> None:
    """The SDK table lists only reasons the sidecar emits (plus INTERNAL)."""
    sent = {reason for _code, reason in status.TABLE.values()} | {status.INTERNAL[1]}
    assert set(_errors.BY_REASON) == sent


def test_sidecar_error_tree_matches_sdk_tree() -> None:
    """Policy and upstream errors sit under the same parents on both sides."""
    for cls, (_code, reason) in status.TABLE.items():
        sdk_cls = _errors.BY_REASON[reason]
        for parent in ("PolicyError", "UpstreamError", "JournalError"):
            side = issubclass(cls, getattr(errors, parent))
            assert side == issubclass(sdk_cls, getattr(_errors, parent)), (reason, parent)


def test_classify_walks_the_class_hierarchy() -> None:
    """A subclass of a listed error gets its parent's row; a foreign exception is INTERNAL."""

    class Special(errors.UpstreamUnavailableError):
        pass

    assert status.classify(Special("x", upstream="u")) == (
        grpc.StatusCode.UNAVAILABLE,
        "UPSTREAM_UNAVAILABLE",
    )
    assert status.classify(KeyError("x")) == status.INTERNAL


def test_upstream_4xx_codes_follow_http_status() -> None:
    """An upstream 4xx keeps reason UPSTREAM_CLIENT_ERROR with the nearest gRPC code."""
    cases = {400: "INVALID_ARGUMENT", 401: "PERMISSION_DENIED", 404: "NOT_FOUND",
             429: "RESOURCE_EXHAUSTED", 418: "FAILED_PRECONDITION"}  # fmt: skip
    for http_status, code_name in cases.items():
        exc = errors.UpstreamClientError("no", upstream="u", http_status=http_status)
        code, reason = status.classify(exc)
        assert (code.name, reason) == (code_name, "UPSTREAM_CLIENT_ERROR")


def test_rich_status_carries_error_info_and_retry_info() -> None:
    """to_rich_status packs ErrorInfo (domain, reason, metadata) and RetryInfo."""
    from google.rpc import error_details_pb2

    exc = errors.UpstreamUnavailableError(
        "down", upstream="llm", http_status=503, retry_after_s=2.5
    )
    code, message, rich = status.to_rich_status(exc)
    assert code == grpc.StatusCode.UNAVAILABLE and message == "down"
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert rich.details[0].Unpack(info) and rich.details[1].Unpack(retry)
    assert (info.domain, info.reason) == ("tether.dev", "UPSTREAM_UNAVAILABLE")
    assert dict(info.metadata) == {"upstream": "llm", "http_status": "503"}
    assert retry.retry_delay.ToNanoseconds() == 2_500_000_000


def test_internal_errors_hide_their_text() -> None:
    """An unexpected exception's text (which may hold anything) is not sent to the caller."""
    _code, message, rich = status.to_rich_status(RuntimeError("sk-secret in a traceback"))
    assert "sk-secret" not in message
    assert b"sk-secret" not in rich.SerializeToString()


def test_timeouts_are_one_except_away() -> None:
    """UpstreamTimeoutError is a DeadlineExceededError in the SDK."""
    assert issubclass(tether.UpstreamTimeoutError, tether.DeadlineExceededError)
    assert issubclass(tether.UpstreamTimeoutError, tether.UpstreamError)
