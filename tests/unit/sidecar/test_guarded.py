"""Guarded calls: how a reported outcome counts, and what a refused guard gives back."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from sidecar import errors
from sidecar.config import parse_config
from sidecar.guarded import CANCELLED_STATUS, CANCELLED_TYPE, GuardedCalls, outcome_of_end
from sidecar.pipeline import Pipeline
from sidecar.policies.base import Verdict
from sidecar.policies.clock import ManualClock
from sidecar.upstreams.registry import build_upstreams
from tether.v1 import sidecar_pb2 as pb

BIG = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 200}  # ~301 tokens


def ended(**error: Any) -> pb.EndCallRequest:
    return pb.EndCallRequest(call_id="c", error=pb.CallError(**error))


def test_cancelled_block_is_neutral() -> None:
    """A cancelled block (type `cancelled` or status 499) counts neither way."""
    assert outcome_of_end(ended(type=CANCELLED_TYPE, status=CANCELLED_STATUS)).verdict is (
        Verdict.NEUTRAL
    )
    assert outcome_of_end(ended(type="CancelledError", status=499)).verdict is Verdict.NEUTRAL
    assert outcome_of_end(ended(type="cancelled")).verdict is Verdict.NEUTRAL


@pytest.mark.parametrize(
    ("error", "verdict"),
    [
        ({"type": "ConnectionError", "retryable": True}, Verdict.FAILURE),
        ({"type": "HTTPError", "status": 503}, Verdict.FAILURE),
        ({"type": "HTTPError", "status": 429}, Verdict.FAILURE),
        ({"type": "HTTPError", "status": 404}, Verdict.SUCCESS),
        ({"type": "ValueError"}, Verdict.SUCCESS),
    ],
)
def test_reported_errors_count_by_cause(error: dict[str, Any], verdict: Verdict) -> None:
    """Transient errors are failures; others mean the dependency answered. Every error
    outcome carries an error, so a token reservation without usage is refunded."""
    outcome = outcome_of_end(ended(**error))
    assert outcome.verdict is verdict and outcome.error is not None


def test_success_without_usage_is_the_shared_success() -> None:
    outcome = outcome_of_end(pb.EndCallRequest(call_id="c", payload=b"{}"))
    assert outcome.verdict is Verdict.SUCCESS and outcome.error is None


def guarded_pipeline(clock: ManualClock) -> Pipeline:
    policies = {
        "breaker": {"fail_max": 1, "reset_timeout_s": 30},
        "rate_limit": {"tokens_per_min": 1000, "mode": "reject"},
        "bulkhead": {"max_in_flight": 1, "max_queue": 0},
    }
    config = parse_config(
        {"upstreams": {"g": {"kind": "model", "type": "guarded", "policies": policies}}}
    )
    return Pipeline(config, build_upstreams(config), clock)


async def test_guard_refused_by_the_breaker_gives_everything_back() -> None:
    """A guard refused by the open breaker refunds its token reservation and frees its
    bulkhead slot; nothing stays in flight."""
    clock = ManualClock()
    pipeline = guarded_pipeline(clock)
    route = pipeline.routes["g"]
    assert route.breaker is not None and route.limiter is not None
    assert route.limiter.tokens is not None
    route.breaker.admit().release(
        outcome_of_end(ended(type="ConnectionError", retryable=True))
    )  # trips it (fail_max 1)
    calls = GuardedCalls(pipeline)
    begin = pb.BeginCallRequest(upstream="g", payload=orjson.dumps(BIG))
    for _ in range(5):  # 5 x ~301 tokens would exceed the 1000 of the bucket if kept
        with pytest.raises(errors.CircuitOpenError):
            await calls.begin(route, begin, pipeline.deadline(None))
    assert route.limiter.tokens.available() == pytest.approx(1000, abs=1)
    assert route.bulkhead is not None and route.bulkhead.in_flight == 0
    assert route.in_flight == 0 and len(calls) == 0
    assert route.limiter.rejected == 0


async def test_failed_guard_without_usage_refunds_its_tokens() -> None:
    """A guarded call that ends in an error and reports no usage spent no tokens."""
    clock = ManualClock()
    pipeline = guarded_pipeline(clock)
    route = pipeline.routes["g"]
    calls = GuardedCalls(pipeline)
    begin = pb.BeginCallRequest(upstream="g", payload=orjson.dumps(BIG))
    answer = await calls.begin(route, begin, pipeline.deadline(None))
    assert route.limiter is not None and route.limiter.tokens is not None
    assert route.limiter.tokens.available() < 800
    error = pb.CallError(type="ValueError", message="bad")
    await calls.end(pb.EndCallRequest(call_id=answer.call_id, error=error))
    assert route.limiter.tokens.available() == pytest.approx(1000, abs=1)
    assert route.in_flight == 0
