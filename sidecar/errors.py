"""Internal errors of the sidecar.

Every failure a caller can see is one of these. They carry facts (which upstream, which HTTP
status, how long to wait) and no transport codes: `sidecar.status` is the one table that turns
them into gRPC status codes with rich details. Messages never contain secrets.

    SidecarError
    ├── InvalidRequestError          malformed request, wrong kind, bad JSON
    ├── UnknownUpstreamError         no upstream of that name
    ├── PayloadTooLargeError         request over `limits.max_payload_bytes`
    ├── NotFoundError                no such run, call or checkpoint in the journal
    ├── UnauthenticatedError         missing or wrong bearer token
    ├── DrainingError                the sidecar is shutting down
    ├── NotSupportedError       an RPC whose feature is not enabled
    ├── PolicyError                  the sidecar refused to call (never counted against upstream)
    │   ├── CircuitOpenError
    │   ├── RateLimitedError
    │   └── OverloadedError
    ├── UpstreamError                the upstream failed (has `upstream`)
    │   ├── UpstreamTimeoutError     no answer within the per-attempt timeout or the deadline
    │   ├── UpstreamUnavailableError 5xx, connection refused or reset
    │   ├── UpstreamBadResponseError answer that is not what the protocol promises
    │   ├── UpstreamResponseTooLargeError
    │   └── UpstreamClientError      4xx: the request was refused; status passed through
    ├── JournalError
    │   ├── NonDeterministicReplayError
    │   ├── OutcomeUnknownError
    │   └── JournalUnavailableError
    └── JournaledError               a journaled failure replayed with its original status
"""

from __future__ import annotations


class SidecarError(Exception):
    """Base of every error the sidecar reports to a caller."""

    retry_after_s: float | None = None
    attempts: int = 0  # upstream attempts made for the call; set by the pipeline

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s

    def metadata(self) -> dict[str, str]:
        """Facts for google.rpc.ErrorInfo.metadata (strings only, never secrets)."""
        return {"attempts": str(self.attempts)} if self.attempts > 0 else {}


class InvalidRequestError(SidecarError):
    """The request cannot be served as sent; `field` names the offending field."""

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(message)
        self.field = field

    def metadata(self) -> dict[str, str]:
        return {"field": self.field} if self.field else {}


class UnknownUpstreamError(SidecarError):
    """No upstream of that name is configured."""

    def __init__(self, upstream: str, known: list[str]) -> None:
        names = ", ".join(sorted(known)) or "none"
        super().__init__(f"unknown upstream {upstream!r}; configured: {names}")
        self.upstream = upstream

    def metadata(self) -> dict[str, str]:
        return {"upstream": self.upstream}


class PayloadTooLargeError(SidecarError):
    """A request payload is larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"payload of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit

    def metadata(self) -> dict[str, str]:
        return {"size_bytes": str(self.size), "limit_bytes": str(self.limit)}


class NotFoundError(SidecarError):
    """A run, call or checkpoint the request names is not in the journal."""


class UnauthenticatedError(SidecarError):
    """The bearer token is missing or wrong."""


class DrainingError(SidecarError):
    """The sidecar is shutting down and takes no new calls."""


class NotSupportedError(SidecarError):
    """The RPC exists in the contract but its feature is not available in this build."""


class PolicyError(SidecarError):
    """The sidecar's own policies refused the call; the upstream was not called."""

    def __init__(self, message: str, *, upstream: str, retry_after_s: float | None = None) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.upstream = upstream

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "upstream": self.upstream}


class CircuitOpenError(PolicyError):
    """The upstream's circuit breaker is open."""


class RateLimitedError(PolicyError):
    """The upstream's rate limit refused the call."""


class OverloadedError(PolicyError):
    """The upstream's bulkhead (in-flight and queue bounds) refused the call."""


class StateUnavailableError(PolicyError):
    """A policy with `on_store_error: fail_closed` refused the call: the shared state store
    (`state.backend: redis`) is down. Nothing was sent; retry after `retry_after_s`."""

    def __init__(self, message: str, *, upstream: str, store: str, policy: str,
                 retry_after_s: float) -> None:  # fmt: skip
        super().__init__(message, upstream=upstream, retry_after_s=retry_after_s)
        self.store = store
        self.policy = policy

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "store": self.store, "policy": self.policy}


class UpstreamError(SidecarError):
    """The upstream was called and failed."""

    def __init__(
        self,
        message: str,
        *,
        upstream: str,
        http_status: int = 0,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.upstream = upstream
        self.http_status = http_status
        self.attempts = 0  # upstream attempts made for the call, set by the pipeline

    def metadata(self) -> dict[str, str]:
        meta = {"upstream": self.upstream}
        if self.http_status:
            meta["http_status"] = str(self.http_status)
        if self.attempts:
            meta["attempts"] = str(self.attempts)
        return meta


class UpstreamTimeoutError(UpstreamError):
    """The upstream did not answer within the per-attempt timeout or the caller's deadline.

    `caller_deadline` is true when the caller's deadline, not the upstream's own timeout, cut
    the attempt: that says nothing about the upstream's health.
    """

    def __init__(self, message: str, *, upstream: str, caller_deadline: bool = False) -> None:
        super().__init__(message, upstream=upstream)
        self.caller_deadline = caller_deadline


class UpstreamUnavailableError(UpstreamError):
    """The upstream answered 5xx, refused the connection or reset it."""


class UpstreamBadResponseError(UpstreamError):
    """The upstream answered something its protocol does not allow (not JSON, cut stream)."""


class UpstreamResponseTooLargeError(UpstreamError):
    """The upstream's answer is larger than the configured limit."""


class UpstreamClientError(UpstreamError):
    """The upstream refused the request with a 4xx; `body` keeps its (redacted, cut) reason."""

    def __init__(
        self,
        message: str,
        *,
        upstream: str,
        http_status: int,
        body: str = "",
        retry_after_s: float | None = None,
        context_exceeded: bool = False,
    ) -> None:
        super().__init__(
            message, upstream=upstream, http_status=http_status, retry_after_s=retry_after_s
        )
        self.body = body
        # the request is longer than the model's context window: retrying cannot help,
        # a larger-context model can (`routes.<model>.context_fallback`)
        self.context_exceeded = context_exceeded

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        if self.body:
            meta["upstream_body"] = self.body
        return meta


class JournalError(SidecarError):
    """The journal cannot answer the call as asked."""


class NonDeterministicReplayError(JournalError):
    """The same idempotency key came back with a different request."""


class OutcomeUnknownError(JournalError):
    """A call was started but never completed, and its upstream is not idempotent."""

    def __init__(self, message: str, *, run_id: str, key: str, upstream: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.key = key
        self.upstream = upstream

    def metadata(self) -> dict[str, str]:
        return {"run_id": self.run_id, "idempotency_key": self.key, "upstream": self.upstream}


class JournalUnavailableError(JournalError):
    """The journal cannot be read or written; the call is refused rather than unjournaled."""


class JournaledError(SidecarError):
    """An error answered from the journal: the status the original call got, again."""

    def __init__(self, message: str, *, code: str, reason: str, metadata: dict[str, str]) -> None:
        super().__init__(message)
        self.code_name = code
        self.reason = reason
        self._metadata = metadata

    def metadata(self) -> dict[str, str]:
        return {**self._metadata, "replayed": "true"}
