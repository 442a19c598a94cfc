"""The per-upstream policies: timeouts, streams, retry, breaker, rate limit, bulkhead,
fallback (`upstreams.<name>.policies`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from sidecar.config.base import DEFAULT_TOTAL_TIMEOUT_S, StrictModel

RetryCondition = (
    Literal["unavailable", "deadline", "bad_response"] | Annotated[int, Field(ge=400, le=599)]
)
# 529: Anthropic's "overloaded"
DEFAULT_RETRY_ON: tuple[RetryCondition, ...] = ("unavailable", "deadline", 429, 500, 502, 503,
                                               504, 529)  # fmt: skip


class RetryPolicy(StrictModel):
    """Retries with exponential backoff and full jitter, bounded by a per-upstream budget."""

    max_attempts: int = Field(4, ge=1, le=20)
    backoff_initial_s: float = Field(0.2, ge=0)
    backoff_max_s: float = Field(10.0, ge=0)
    jitter: Literal["full", "none"] = "full"
    retry_on: list[RetryCondition] = Field(default_factory=lambda: list(DEFAULT_RETRY_ON))
    # retries after an attempt the upstream let time out (a silent upstream is usually still
    # silent); with a fallback to take the call, none: it fails over at once
    timeout_retries: int = Field(1, ge=0, le=19)
    budget_ratio: float = Field(0.2, ge=0, le=10)
    budget_min_retries: int = Field(1, ge=0)
    budget_window_s: int = Field(10, ge=1, le=3600)


class BreakerPolicy(StrictModel):
    """Opens after `fail_max` consecutive failures; probes again after `reset_timeout_s`."""

    fail_max: int = Field(5, ge=1)
    reset_timeout_s: float = Field(30.0, gt=0)
    success_threshold: int = Field(1, ge=1)
    half_open_probes: int = Field(1, ge=1)
    # when the shared state store (state.backend: redis) fails: keep serving on this
    # replica's own breaker (fail_open) or refuse the call (fail_closed)
    on_store_error: Literal["fail_open", "fail_closed"] = "fail_open"


class RateLimitPolicy(StrictModel):
    """Requests per second with a burst, and model tokens per minute."""

    requests_per_s: float | None = Field(None, gt=0)
    burst: float | None = Field(None, ge=1)
    tokens_per_min: int | None = Field(None, gt=0)
    mode: Literal["wait", "reject"] = "wait"
    max_wait_s: float = Field(5.0, ge=0)
    # when the shared state store fails: a local limiter at 1/state.replicas of the limit
    # (fail_open) or refuse the call (fail_closed)
    on_store_error: Literal["fail_open", "fail_closed"] = "fail_open"

    @model_validator(mode="after")
    def _some_limit(self) -> RateLimitPolicy:
        if self.requests_per_s is None and self.tokens_per_min is None:
            raise ValueError("set requests_per_s, tokens_per_min or both")
        return self


class BulkheadPolicy(StrictModel):
    """At most `max_in_flight` calls at once, `max_queue` more waiting `queue_timeout_s`."""

    max_in_flight: int = Field(32, ge=1)
    max_queue: int = Field(64, ge=0)
    queue_timeout_s: float = Field(2.0, ge=0)


class StreamPolicy(StrictModel):
    """Per-attempt bounds of a stream; `null`: the upstream's per-attempt timeout."""

    first_chunk_timeout_s: float | None = Field(None, gt=0)  # the wait for the first chunk
    idle_timeout_s: float | None = Field(None, gt=0)  # each gap between chunks


class Policies(StrictModel):
    """Per-upstream policies; `null` turns a default-on policy off."""

    timeout_s: float | None = Field(None, gt=0)  # per attempt; else the upstream's timeout_s
    # the whole call: attempts, backoffs, fallbacks, a stream's recoveries; the caller's
    # deadline when it sets none, the tighter of the two when it does (null: no budget)
    total_timeout_s: float | None = Field(DEFAULT_TOTAL_TIMEOUT_S, gt=0)
    stream: StreamPolicy = Field(default_factory=StreamPolicy)
    retry: RetryPolicy | None = Field(default_factory=RetryPolicy)
    breaker: BreakerPolicy | None = Field(default_factory=BreakerPolicy)
    rate_limit: RateLimitPolicy | None = None
    bulkhead: BulkheadPolicy | None = Field(default_factory=BulkheadPolicy)
    fallback: list[str] = Field(default_factory=list)
