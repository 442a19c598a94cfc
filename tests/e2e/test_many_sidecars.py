"""Three real sidecar processes on the machine's Redis share rate limits and a breaker, and a
fault-injecting upstream counts every request that reaches it."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import tether
from tests.e2e.processes import stop, write_config
from tests.integration.faults import FaultServer
from tests.integration.support import LoopThread
from tests.redis_support import delete_prefix, require_redis

pytestmark = pytest.mark.services
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
ESTIMATE, USAGE = 51, 10  # tokens: estimated for CHAT ("hi" + max_tokens), then reported
# Low enough that even a loaded test machine offers more than the limits admit.
REQUESTS_PER_S, TOKENS_PER_MIN, LOAD_S = 20, 1200, 3.0
BREAKER = {"fail_max": 3, "reset_timeout_s": 2.0, "half_open_probes": 2}


@dataclass
class Fleet:
    addresses: list[str]
    faults: FaultServer


def upstreams(faults: FaultServer) -> dict[str, Any]:
    requests = {"requests_per_s": REQUESTS_PER_S, "mode": "reject"}
    tokens = {"tokens_per_min": TOKENS_PER_MIN, "mode": "reject"}

    def limited(limit: dict[str, Any], **spec: Any) -> dict[str, Any]:
        return {"kind": "model", **spec, "policies": {"retry": None, "breaker": None,
                                                      "rate_limit": limit}}  # fmt: skip

    tok = {"type": "openai", "base_url": faults.base_url("tok")}
    return {
        "req-solo": limited(requests, type="mock"),
        "req-shared": limited(requests, type="mock"),
        "tok-solo": limited(tokens, **tok),
        "tok-shared": limited(tokens, **tok),
        "brk": {"kind": "model", "type": "openai", "base_url": faults.base_url("brk"),
                "policies": {"retry": None, "breaker": BREAKER}},
    }  # fmt: skip


def start_sidecar(config: Path) -> subprocess.Popen[bytes]:
    """`python -m sidecar serve` logging warnings only (not a line per refused call)."""
    log = open(config.parent / "sidecar.log", "wb")  # noqa: SIM115
    command = [sys.executable, "-m", "sidecar", "serve", "--config", str(config)]
    return subprocess.Popen([*command, "--log-level", "WARNING"], stdout=log, stderr=log)


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    """Three sidecars with the same config (one ConfigMap, three pods), one Redis prefix."""
    url = require_redis()
    prefix = f"tt-{uuid.uuid4().hex[:10]}"
    root = Path(tempfile.mkdtemp(prefix="tt-", dir="/tmp"))
    loop = LoopThread()
    faults = FaultServer()
    loop.run(faults.start())
    state = {"backend": "redis", "url": url, "key_prefix": prefix, "replicas": 3,
             "timeout_s": 1.0}  # fmt: skip
    configs = []
    for n in range(3):
        (root / f"s{n}").mkdir()
        configs.append(write_config(root / f"s{n}", upstreams(faults), state=state))
    procs = [start_sidecar(config) for config, _ in configs]  # starting side by side
    try:
        for _, address in configs:
            with tether.Client(address) as client:
                client.wait_ready(30)
        yield Fleet([address for _, address in configs], faults)
    finally:
        for proc in procs:  # SIGTERM to all, then wait for each: they drain side by side
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            stop(proc)
        loop.run(faults.stop())
        loop.stop()
        delete_prefix(url, prefix)
        shutil.rmtree(root, ignore_errors=True)


async def hammer(addresses: list[str], upstream: str, seconds: float, workers: int = 4) -> int:
    """Calls without pause from `workers` callers per sidecar for `seconds`; the admitted
    ones (the others are refused by the rate limit at once)."""
    admitted = 0
    deadline = time.monotonic() + seconds

    async def work(client: tether.AsyncClient) -> None:
        nonlocal admitted
        while time.monotonic() < deadline:
            with contextlib.suppress(tether.RateLimitedError):
                await client.model(upstream, CHAT)
                admitted += 1

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(tether.AsyncClient(a)) for a in addresses]
        await asyncio.gather(*(work(c) for c in clients for _ in range(workers)))
    return admitted


async def test_three_sidecars_admit_what_one_admits(fleet: Fleet) -> None:
    """Unthrottled load spread over three sidecars for 3 s admits within 5% of what one
    sidecar admits with the same limit: requests per second (burst + rate x 3 s), and tokens
    per minute with every estimate settled to the usage the upstream reports."""
    one = fleet.addresses[:1]
    solo_req, solo_tok = await asyncio.gather(
        hammer(one, "req-solo", LOAD_S, workers=8), hammer(one, "tok-solo", LOAD_S, workers=8)
    )
    shared_req, shared_tok = await asyncio.gather(
        hammer(fleet.addresses, "req-shared", LOAD_S),
        hammer(fleet.addresses, "tok-shared", LOAD_S),
    )
    expected_req = REQUESTS_PER_S * (1 + LOAD_S)  # the burst (one second's worth) + 3 s
    assert expected_req * 0.95 <= solo_req <= expected_req * 1.05
    assert abs(shared_req - solo_req) <= 0.05 * solo_req, (solo_req, shared_req)
    # Settled to 10 tokens each, the bucket (its minute at once, then its rate) lasts about
    # 126 calls; unsettled 51-token estimates would have stopped near 25.
    expected_tok = TOKENS_PER_MIN * (1 + LOAD_S / 60) / USAGE
    assert expected_tok * 0.9 <= solo_tok <= expected_tok * 1.02
    assert abs(shared_tok - solo_tok) <= 0.05 * solo_tok, (solo_tok, shared_tok)


def breaker_state(address: str) -> str:
    with tether.Client(address) as client:
        return client.status().upstreams["brk"].breaker_state


def wait_for(check: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


async def test_breaker_opened_through_one_sidecar_holds_for_all(fleet: Fleet) -> None:
    """Failures seen through A open the breaker at B and C, which refuse without calling the
    upstream; once half-open, the three together send at most half_open_probes probes, and
    a successful probe closes the breaker everywhere."""
    a, b, c = fleet.addresses
    ep = fleet.faults.endpoint("brk")
    ep.fail_status = 503
    async with tether.AsyncClient(a) as client:
        for _ in range(BREAKER["fail_max"]):
            with pytest.raises(tether.UpstreamUnavailableError):
                await client.model("brk", CHAT)
    opened = time.monotonic()
    assert ep.hits == 3
    await asyncio.to_thread(wait_for, lambda: breaker_state(b) == breaker_state(c) == "open")
    for address in (b, c):
        async with tether.AsyncClient(address) as client:
            for _ in range(5):
                with pytest.raises(tether.CircuitOpenError) as info:
                    await client.model("brk", CHAT)
                assert info.value.retry_after_s is not None
                assert 0 < info.value.retry_after_s <= BREAKER["reset_timeout_s"]
    assert ep.hits == 3  # B and C never called it
    ep.fail_status, ep.delay_s = 0, 0.5  # healthy again, slow: the probes stay in flight
    ep.max_in_flight = 0
    await asyncio.sleep(max(0.0, opened + BREAKER["reset_timeout_s"] + 0.2 - time.monotonic()))
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(tether.AsyncClient(x)) for x in (a, b, c)]
        for _ in range(5):  # volleys of 30 calls until a probe answers (claims take a moment)
            before = ep.hits
            results = await asyncio.gather(
                *(cl.model("brk", CHAT) for cl in clients for _ in range(10)),
                return_exceptions=True,
            )
            probes = ep.hits - before
            assert probes <= BREAKER["half_open_probes"]
            assert sum(isinstance(r, tether.Result) for r in results) == probes
            assert all(isinstance(r, tether.Result | tether.CircuitOpenError) for r in results)
            if probes:
                break
            await asyncio.sleep(0.2)
    assert probes >= 1 and ep.max_in_flight <= BREAKER["half_open_probes"]
    await asyncio.to_thread(wait_for, lambda: {breaker_state(x) for x in (a, b, c)} == {"closed"})
    ep.delay_s = 0.0
    for address in (a, b, c):
        async with tether.AsyncClient(address) as client:
            assert (await client.model("brk", CHAT)).upstream == "brk"
