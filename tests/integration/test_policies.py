"""Policies end to end: a real sidecar, a fault-injecting upstream, exact upstream counts."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

import tether
from sidecar.server import SidecarServer
from tests.integration.conftest import SidecarFactory
from tests.integration.faults import FaultServer

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
# A generous budget minimum: these tests count retries of single calls on a quiet upstream.
FAST_RETRY = {"max_attempts": 4, "backoff_initial_s": 0.01, "backoff_max_s": 0.05,
              "budget_min_retries": 3}  # fmt: skip


def upstream(faults: FaultServer, name: str, **policies: Any) -> dict[str, Any]:
    """A model upstream on the fault server's endpoint `name` with the given policies."""
    return {"kind": "model", "type": "openai", "base_url": faults.base_url(name),
            "policies": policies}  # fmt: skip


def gauges(server: SidecarServer, name: str) -> dict[str, float]:
    with tether.Client(server.addresses[0]) as client:
        return dict(client.status().upstreams[name].gauges)


def test_fails_n_times_then_succeeds(make_sidecar: SidecarFactory, faults: FaultServer) -> None:
    """An upstream failing N times then answering gets exactly 1 + N calls; success returned."""
    server = make_sidecar({"u": upstream(faults, "u", retry=FAST_RETRY, breaker=None)})
    faults.endpoint("u").fail_next = 2
    with tether.Client(server.addresses[0]) as client:
        result = client.model("u", CHAT)
    assert faults.endpoint("u").hits == 3
    assert result.attempts == 3 and result.json()["choices"][0]["message"]["content"] == "ok"


def test_retries_exhausted(make_sidecar: SidecarFactory, faults: FaultServer) -> None:
    """A failing upstream gets exactly max_attempts calls; the last status is returned."""
    retry = {**FAST_RETRY, "max_attempts": 3}
    server = make_sidecar({"u": upstream(faults, "u", retry=retry, breaker=None)})
    faults.endpoint("u").fail_status = 502
    with (
        tether.Client(server.addresses[0]) as client,
        pytest.raises(tether.UpstreamUnavailableError) as info,
    ):
        client.model("u", CHAT)
    assert faults.endpoint("u").hits == 3
    assert info.value.http_status == 502 and info.value.metadata["attempts"] == "3"


def test_non_retryable_status_is_not_retried(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """A 400 is not retried: exactly one upstream call."""
    server = make_sidecar({"u": upstream(faults, "u", retry=FAST_RETRY)})
    faults.endpoint("u").fail_status = 400
    with tether.Client(server.addresses[0]) as client, pytest.raises(tether.UpstreamClientError):
        client.model("u", CHAT)
    assert faults.endpoint("u").hits == 1


def test_breaker_trips_fails_fast_and_recovers(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """After fail_max failures calls fail fast with UNAVAILABLE and a delay, the upstream
    count does not move, and after reset_timeout_s one probe closes the breaker."""
    breaker = {"fail_max": 3, "reset_timeout_s": 0.4}
    server = make_sidecar({"u": upstream(faults, "u", retry=None, breaker=breaker)})
    ep = faults.endpoint("u")
    ep.fail_status = 503
    with tether.Client(server.addresses[0]) as client:
        for _ in range(3):
            with pytest.raises(tether.UpstreamUnavailableError):
                client.model("u", CHAT)
        assert client.status().upstreams["u"].breaker_state == "open"
        for _ in range(5):
            started = time.perf_counter()
            with pytest.raises(tether.CircuitOpenError) as info:
                client.model("u", CHAT)
            # fast: far below any wait on the upstream (a loose bound: the machine is shared)
            assert time.perf_counter() - started < 0.1
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert info.value.retry_after_s is not None and 0 < info.value.retry_after_s <= 0.4
        assert ep.hits == 3
        ep.fail_status = 0
        time.sleep(0.45)
        assert client.model("u", CHAT).upstream == "u"
        assert ep.hits == 4
        assert client.status().upstreams["u"].breaker_state == "closed"


async def test_half_open_admits_only_its_probes(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """50 concurrent callers while half-open: at most half_open_probes reach the upstream."""
    breaker = {"fail_max": 1, "reset_timeout_s": 0.2, "half_open_probes": 2}
    server = make_sidecar({"u": upstream(faults, "u", retry=None, breaker=breaker)})
    ep = faults.endpoint("u")
    ep.fail_status = 503
    async with tether.AsyncClient(server.addresses[0]) as client:
        with pytest.raises(tether.UpstreamUnavailableError):
            await client.model("u", CHAT)
        ep.fail_status, ep.delay_s = 0, 0.3  # healthy again, but slow: probes stay in flight
        await asyncio.sleep(0.25)
        hits_before = ep.hits
        results = await asyncio.gather(
            *(client.model("u", CHAT) for _ in range(50)), return_exceptions=True
        )
    reached = ep.hits - hits_before
    assert reached == 2
    assert sum(isinstance(r, tether.Result) for r in results) == 2
    assert all(isinstance(r, tether.CircuitOpenError | tether.Result) for r in results)


def test_sidecar_rejections_do_not_count_as_failures(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """Rate-limit, bulkhead and cancelled-call outcomes leave the failure count unchanged."""
    breaker = {"fail_max": 5, "reset_timeout_s": 30}
    server = make_sidecar({
        "limited": upstream(faults, "limited", retry=None, breaker=breaker,
                            rate_limit={"requests_per_s": 0.1, "burst": 2, "mode": "reject"}),
        "narrow": upstream(faults, "narrow", retry=None, breaker=breaker,
                           bulkhead={"max_in_flight": 1, "max_queue": 0}),
        "hangs": upstream(faults, "hangs", retry=None, breaker=breaker),
    })  # fmt: skip
    for name in ("limited", "narrow", "hangs"):
        faults.endpoint(name).fail_next = 2
    with tether.Client(server.addresses[0]) as client:
        for name in ("limited", "narrow", "hangs"):
            for _ in range(2):
                with pytest.raises(tether.UpstreamUnavailableError):
                    client.model(name, CHAT)
        for _ in range(3):
            with pytest.raises(tether.RateLimitedError):
                client.model("limited", CHAT)
        faults.endpoint("narrow").delay_s = 0.5
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(client.model, "narrow", CHAT)
            time.sleep(0.1)
            with pytest.raises(tether.OverloadedError):
                client.model("narrow", CHAT)
            slow.result()
        faults.endpoint("hangs").hang = True
        for _ in range(3):
            with pytest.raises(tether.DeadlineExceededError):
                client.model("hangs", CHAT, timeout_s=0.1)
    time.sleep(0.1)
    assert gauges(server, "limited")["breaker.failures"] == 2
    assert gauges(server, "narrow")["breaker.failures"] == 0  # the slow call succeeded
    assert gauges(server, "hangs")["breaker.failures"] == 2


def test_retry_budget_bounds_attempts(make_sidecar: SidecarFactory, faults: FaultServer) -> None:
    """A 100% failing upstream under steady load gets at most (1 + budget_ratio) x calls."""
    retry = {**FAST_RETRY, "budget_ratio": 0.2, "budget_min_retries": 0}
    server = make_sidecar({"u": upstream(faults, "u", retry=retry, breaker=None)})
    faults.endpoint("u").fail_status = 503
    calls = 200

    def one(client: tether.Client) -> None:
        with pytest.raises(tether.UpstreamUnavailableError):
            client.model("u", CHAT)

    with tether.Client(server.addresses[0]) as client, ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: one(client), range(calls)))
    hits = faults.endpoint("u").hits
    assert calls < hits <= calls * 1.2
    assert gauges(server, "u")["retry.budget_exhausted"] > 0


def test_deadline_on_hanging_upstream(make_sidecar: SidecarFactory, faults: FaultServer) -> None:
    """A 100 ms deadline on a hanging upstream: DEADLINE_EXCEEDED within 200 ms, no retry
    after the deadline, and the upstream request is cancelled."""
    server = make_sidecar({"u": upstream(faults, "u", retry=FAST_RETRY)})
    ep = faults.endpoint("u")
    ep.hang = True
    with tether.Client(server.addresses[0]) as client:
        client.status()  # connected: the deadline measures the call alone
        started = time.perf_counter()
        with pytest.raises(tether.DeadlineExceededError):
            client.model("u", CHAT, timeout_s=0.1)
        assert time.perf_counter() - started < 0.2
    time.sleep(0.3)
    assert ep.hits == 1 and ep.cancelled == 1


def test_rate_limit_admits_burst_plus_rate(make_sidecar: SidecarFactory) -> None:
    """Over 3 s of an unthrottled caller, a limit of R/s with burst B admits B + 3R (±5%)."""
    rate, burst = 20, 10
    limit = {"requests_per_s": rate, "burst": burst, "mode": "reject"}
    mock = {"kind": "model", "type": "mock", "policies": {"rate_limit": limit, "retry": None}}
    server = make_sidecar({"m": mock})
    admitted = refused = 0
    with tether.Client(server.addresses[0]) as client:
        client.status()
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            try:
                client.model("m", CHAT)
                admitted += 1
            except tether.RateLimitedError as error:
                assert error.retry_after_s is not None and error.retry_after_s > 0
                refused += 1
    expected = burst + 3 * rate
    assert abs(admitted - expected) <= 0.05 * expected, (admitted, refused)
    assert refused > admitted  # the caller really was unthrottled


def test_tokens_per_minute_settle_with_real_usage(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """Token reservations are settled with the upstream's usage; the limit rejects when the
    tokens are spent, with the delay after which they come back."""
    limit = {"tokens_per_min": 600, "mode": "reject"}
    server = make_sidecar({"u": upstream(faults, "u", retry=None, rate_limit=limit)})
    faults.endpoint("u").usage_tokens = 20  # each call reserves ~55 (max_tokens 50), uses 20
    admitted = 0
    with tether.Client(server.addresses[0]) as client:
        while True:
            try:
                client.model("u", CHAT)
            except tether.RateLimitedError as error:
                assert error.retry_after_s is not None and error.retry_after_s > 0
                break
            admitted += 1
            assert admitted < 100, "the token limit never refused"
    # 600 tokens at 20 a call (plus a little refill); without settlement ~11 calls would pass.
    assert 28 <= admitted <= 33, admitted


async def test_bulkhead_bounds_concurrency(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """10x max_in_flight concurrent calls never exceed max_in_flight at the upstream;
    calls beyond the queue are refused at once."""
    bulkhead = {"max_in_flight": 3, "max_queue": 5, "queue_timeout_s": 5}
    server = make_sidecar({"u": upstream(faults, "u", retry=None, bulkhead=bulkhead)})
    ep = faults.endpoint("u")
    ep.delay_s = 1.0  # long enough that all 30 arrive while 8 hold or wait for slots

    async def timed(client: tether.AsyncClient) -> tuple[float, object]:
        started = time.perf_counter()
        try:
            return time.perf_counter() - started, await client.model("u", CHAT)
        except tether.TetherError as error:
            return time.perf_counter() - started, error

    async with tether.AsyncClient(server.addresses[0]) as client:
        await client.status()
        outcomes = await asyncio.gather(*(timed(client) for _ in range(30)))
    ok = [r for _, r in outcomes if isinstance(r, tether.Result)]
    refused = [(t, r) for t, r in outcomes if isinstance(r, tether.OverloadedError)]
    assert ep.max_in_flight == 3
    assert len(ok) == 8 and len(refused) == 22
    assert all(t < 0.5 for t, _ in refused)  # at once: the queue would wait 5 s


def test_fallback_answers_when_primary_is_open(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """With the primary's breaker open, the fallback answers and the response names it."""
    breaker = {"fail_max": 2, "reset_timeout_s": 30}
    server = make_sidecar({
        "primary": upstream(faults, "primary", retry=None, breaker=breaker, fallback=["backup"]),
        "backup": upstream(faults, "backup", retry=None),
    })  # fmt: skip
    faults.endpoint("primary").fail_status = 503
    with tether.Client(server.addresses[0]) as client:
        answers = [client.model("primary", CHAT) for _ in range(4)]
        status = client.status()
    assert [a.upstream for a in answers] == ["backup"] * 4
    assert faults.endpoint("primary").hits == 2  # then open: no more calls
    assert faults.endpoint("backup").hits == 4
    assert status.upstreams["primary"].breaker_state == "open"
    assert status.upstreams["primary"].fallbacks == 4
    assert answers[0].attempts == 2 and answers[3].attempts == 1


def test_stream_retries_and_falls_back_before_first_chunk(make_sidecar: SidecarFactory) -> None:
    """A stream failing before its first chunk is retried, then served by the fallback."""
    retry = {**FAST_RETRY, "max_attempts": 2}
    server = make_sidecar({
        "flaky": {"kind": "model", "type": "mock", "fail_first": 1, "policies": {"retry": retry}},
        "down": {"kind": "model", "type": "mock", "failure_rate": 1.0,
                 "policies": {"retry": retry, "fallback": ["backup"]}},
        "backup": {"kind": "model", "type": "mock"},
    })  # fmt: skip
    with tether.Client(server.addresses[0]) as client:
        stream = client.stream_model("flaky", CHAT)
        hits = {c["hit"] for c in stream}
        assert hits == {2}  # the first hit failed before any chunk; the retry streamed
        assert (stream.summary.upstream, stream.summary.attempts) == ("flaky", 2)
        stream = client.stream_model("down", CHAT)
        chunks = list(stream)
        status = client.status()
    assert chunks and all(c["hit"] == 1 for c in chunks)
    assert (stream.summary.upstream, stream.summary.attempts) == ("backup", 3)
    assert status.upstreams["down"].hits == 2 and status.upstreams["down"].fallbacks == 1


def test_retry_after_is_honoured(make_sidecar: SidecarFactory, faults: FaultServer) -> None:
    """A 503 with Retry-After 0.3 is retried no sooner than 0.3 s later."""
    retry = {**FAST_RETRY, "backoff_max_s": 1.0}
    server = make_sidecar({"u": upstream(faults, "u", retry=retry, breaker=None)})
    ep = faults.endpoint("u")
    ep.fail_next, ep.retry_after = 1, "0.3"
    with tether.Client(server.addresses[0]) as client:
        client.status()
        started = time.perf_counter()
        result = client.model("u", CHAT)
        elapsed = time.perf_counter() - started
    assert ep.hits == 2 and result.attempts == 2
    assert elapsed >= 0.3


def test_long_retry_after_ends_the_retries(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """Without a deadline, a Retry-After beyond backoff_max_s is not slept: the error, with
    its delay, goes back to the caller after one attempt."""
    server = make_sidecar({"u": upstream(faults, "u", retry=FAST_RETRY, breaker=None)})
    ep = faults.endpoint("u")
    ep.fail_status, ep.retry_after = 503, "30"
    with tether.Client(server.addresses[0]) as client:
        client.status()
        started = time.perf_counter()
        with pytest.raises(tether.UpstreamUnavailableError) as info:
            client.model("u", CHAT)
        assert time.perf_counter() - started < 0.5
    assert ep.hits == 1 and info.value.retry_after_s == pytest.approx(30.0)


@pytest.mark.parametrize(("idempotent", "hits"), [(False, 1), (True, 4)])
def test_tools_are_retried_only_when_idempotent(
    make_sidecar: SidecarFactory, faults: FaultServer, idempotent: bool, hits: int
) -> None:
    """A tool upstream failing with 503 is retried only when marked `idempotent: true`."""
    tool = {"kind": "tool", "type": "http", "url": faults.tool_url("t"), "idempotent": idempotent,
            "policies": {"retry": FAST_RETRY, "breaker": None}}  # fmt: skip
    server = make_sidecar({"t": tool})
    faults.endpoint("t").fail_status = 503
    with tether.Client(server.addresses[0]) as client:
        with pytest.raises(tether.UpstreamUnavailableError):
            client.tool("t", {"q": 1})
        assert client.status().upstreams["t"].retries == hits - 1
    assert faults.endpoint("t").hits == hits


def test_backoff_never_sleeps_past_the_deadline(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """A Retry-After longer than what is left of the deadline ends the call at once with the
    upstream's error, not DEADLINE_EXCEEDED once the deadline has passed."""
    retry = {**FAST_RETRY, "backoff_max_s": 5.0}
    server = make_sidecar({"u": upstream(faults, "u", retry=retry, breaker=None)})
    ep = faults.endpoint("u")
    ep.fail_status, ep.retry_after = 503, "1"
    with tether.Client(server.addresses[0]) as client:
        client.status()
        started = time.perf_counter()
        with pytest.raises(tether.UpstreamUnavailableError):
            client.model("u", CHAT, timeout_s=0.3)
        elapsed = time.perf_counter() - started
    assert elapsed < 0.25 and ep.hits == 1


def test_breaker_tripping_mid_retry_returns_the_upstream_error(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """When an attempt trips the breaker, the call ends with that upstream error and its
    attempts, not a CircuitOpenError after one more backoff; only real retries count."""
    breaker = {"fail_max": 2, "reset_timeout_s": 30}
    server = make_sidecar({"u": upstream(faults, "u", retry=FAST_RETRY, breaker=breaker)})
    faults.endpoint("u").fail_status = 503
    with tether.Client(server.addresses[0]) as client:
        with pytest.raises(tether.UpstreamUnavailableError) as info:
            client.model("u", CHAT)
        status = client.status().upstreams["u"]
    assert info.value.metadata["attempts"] == "2" and faults.endpoint("u").hits == 2
    assert status.breaker_state == "open" and status.retries == 1
    assert status.gauges["breaker.rejected"] == 0


def test_refused_primary_stream_counts_only_admitted_attempts(
    make_sidecar: SidecarFactory,
) -> None:
    """A stream refused by the primary's open breaker and served by the fallback reports one
    attempt, like a unary call."""
    server = make_sidecar({
        "down": {"kind": "model", "type": "mock", "failure_rate": 1.0,
                 "policies": {"retry": None, "breaker": {"fail_max": 1, "reset_timeout_s": 30},
                              "fallback": ["backup"]}},
        "backup": {"kind": "model", "type": "mock"},
    })  # fmt: skip
    with tether.Client(server.addresses[0]) as client:
        first = client.stream_model("down", CHAT)
        list(first)
        second = client.stream_model("down", CHAT)
        list(second)
        unary = client.model("down", CHAT)
    assert (first.summary.upstream, first.summary.attempts) == ("backup", 2)
    assert (second.summary.upstream, second.summary.attempts) == ("backup", 1)
    assert (unary.upstream, unary.attempts) == ("backup", 1)


def test_outage_then_recovery_under_steady_calls(
    make_sidecar: SidecarFactory, faults: FaultServer
) -> None:
    """A primary down for a while, under a steady sequence of calls: the fallback serves
    during the outage, the breaker probes, and traffic is back on the primary within one
    reset timeout of its recovery."""
    reset_s = 0.4
    breaker = {"fail_max": 2, "reset_timeout_s": reset_s}
    server = make_sidecar({
        "primary": upstream(faults, "primary", retry=None, breaker=breaker, fallback=["backup"]),
        "backup": upstream(faults, "backup", retry=None),
    })  # fmt: skip
    primary = faults.endpoint("primary")
    served: list[tuple[float, str]] = []
    with tether.Client(server.addresses[0]) as client:
        started = time.monotonic()

        def call_for(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                served.append((time.monotonic() - started, client.model("primary", CHAT).upstream))
                time.sleep(0.02)

        call_for(0.3)
        primary.fail_status = 503
        call_for(1.0)
        primary.fail_status = 0
        recovered = time.monotonic() - started
        call_for(1.0)
        status = client.status().upstreams["primary"]
    during = [who for t, who in served if 0.35 < t < 1.3]
    assert during and set(during) == {"backup"}  # every call answered, by the fallback
    back = next(t for t, who in served if t > recovered and who == "primary")
    assert back - recovered <= reset_s + 0.25, (back, recovered)  # + call spacing and jitter
    assert all(who == "primary" for t, who in served if t > back)
    assert status.breaker_state == "closed" and status.gauges["breaker.transitions"] >= 3
