"""Run the plan: each scenario's systems in alternating rounds, then the memory run.

Per system and scenario it records latency percentiles (to the end of the call and, for
streams, to the first chunk), calls/s, errors, and for proxies the CPU time of the proxy's
process tree per call, how busy its core was, and its peak RSS so far.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import aiohttp

import tether
from bench.load import Call, Keys, Samples, grpc_call, http_call, run_load
from bench.plan import DIRECT, FLOOR, FLOOR_GRPC, FLOOR_HTTP, GRPC, LITELLM, Plan, Scenario
from bench.procs import cpu_s, peak_rss_mb, rss_mb
from bench.systems import Proxy


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q`-th percentile (0 < q <= 100) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary_ms(values: list[float]) -> dict[str, float]:
    return {f"p{q}": percentile(values, q) * 1000 for q in (50, 90, 99)}


@dataclass
class Target:
    """How one system is called in one scenario, and the proxy process it goes through."""

    call: Call
    proxy: Proxy | None


class Runner:
    """Holds the running systems and their clients; measures scenarios against them."""

    def __init__(
        self,
        plan: Plan,
        *,
        upstream_url: str,
        proxies: dict[str, Proxy],
        session: aiohttp.ClientSession,
        grpc: dict[str, tether.AsyncClient],
    ) -> None:
        self.plan = plan
        self.upstream_url = upstream_url
        self.proxies = proxies  # by variant name, and "litellm" and "floor"
        self.session = session
        self.grpc = grpc  # by variant name, and "floor"

    def target(self, scenario: Scenario, system: str) -> Target:
        stream = scenario.stream
        name = scenario.variant.name
        keys = Keys(f"{scenario.key}-{system}") if scenario.variant.journal != "none" else None
        if system == DIRECT:
            url = f"{self.upstream_url}/v1/chat/completions"
            return Target(http_call(self.session, url, stream=stream), None)
        if system == GRPC:
            return Target(grpc_call(self.grpc[name], stream=stream, keys=keys), self.proxies[name])
        if system == FLOOR_GRPC:
            return Target(grpc_call(self.grpc[FLOOR], stream=stream), self.proxies[FLOOR])
        proxy = self.proxies[{LITELLM: LITELLM, FLOOR_HTTP: FLOOR}.get(system, name)]
        call = http_call(
            self.session,
            f"{proxy.http_url}/chat/completions",
            stream=stream,
            headers=proxy.headers,
            keys=keys,
        )
        return Target(call, proxy)

    async def scenario(self, scenario: Scenario) -> dict[str, Any]:
        """Warm up each system, then alternate them round by round (ABC, CBA, ...)."""
        plan = self.plan
        targets = {system: self.target(scenario, system) for system in scenario.systems}
        per_round = max(scenario.concurrency, scenario.calls // plan.rounds)
        warmup = max(scenario.concurrency, min(plan.warmup_calls, per_round))
        for target in targets.values():
            await run_load(
                target.call,
                calls=warmup,
                concurrency=scenario.concurrency,
                max_s=min(plan.round_max_s / 2, 1.5),
            )
        samples = {system: Samples() for system in targets}
        cpu = dict.fromkeys(targets, 0.0)
        order = list(targets)
        for round_no in range(plan.rounds):
            for system in order if round_no % 2 == 0 else order[::-1]:
                target = targets[system]
                before = cpu_s(target.proxy.child.pid) if target.proxy else 0.0
                got = await run_load(
                    target.call,
                    calls=per_round,
                    concurrency=scenario.concurrency,
                    max_s=plan.round_max_s,
                )
                if target.proxy:
                    cpu[system] += cpu_s(target.proxy.child.pid) - before
                samples[system].extend(got)
        return {
            system: self._result(samples[system], cpu[system], targets[system].proxy, scenario)
            for system in targets
        }

    @staticmethod
    def _result(
        samples: Samples, cpu_total_s: float, proxy: Proxy | None, scenario: Scenario
    ) -> dict[str, Any]:
        ok = samples.ok
        result: dict[str, Any] = {
            "calls": ok + sum(samples.errors.values()),
            "ok": ok,
            "errors": dict(samples.errors),
            "first_error": samples.first_error,
            "wall_s": samples.wall_s,
            "calls_per_s": ok / samples.wall_s if samples.wall_s else 0.0,
            "latency_ms": summary_ms(samples.latency_s),
        }
        if scenario.stream:
            result["first_chunk_ms"] = summary_ms(samples.first_chunk_s)
        if proxy is not None:
            result["proxy"] = proxy.name
            result["cpu_ms_per_call"] = cpu_total_s * 1000 / ok if ok else math.nan
            result["core_busy"] = cpu_total_s / samples.wall_s if samples.wall_s else 0.0
            result["peak_rss_mb"] = peak_rss_mb(proxy.child.pid)
        return result

    async def memory(self, calls: int, variant: str) -> dict[str, Any]:
        """`calls` journaled calls at c=32 (16 over gRPC, 16 over HTTP) in four quarters,
        the sidecar's RSS sampled after each quarter."""
        proxy = self.proxies[variant]
        keys = Keys("memory")
        grpc = grpc_call(self.grpc[variant], stream=False, keys=keys)
        url = f"{proxy.http_url}/chat/completions"
        http = http_call(self.session, url, stream=False, keys=keys)
        quarter = calls // 4
        samples = Samples()
        rss, cpu_before = [], cpu_s(proxy.child.pid)
        for _ in range(4):
            parts = await asyncio.gather(
                run_load(grpc, calls=quarter // 2, concurrency=16, max_s=math.inf),
                run_load(http, calls=quarter - quarter // 2, concurrency=16, max_s=math.inf),
            )
            wall = max(part.wall_s for part in parts)
            for part in parts:
                part.wall_s = 0.0
                samples.extend(part)
            samples.wall_s += wall
            rss.append(rss_mb(proxy.child.pid))
        cpu_total = cpu_s(proxy.child.pid) - cpu_before
        return {
            "proxy": proxy.name,
            "calls": samples.ok + sum(samples.errors.values()),
            "ok": samples.ok,
            "errors": dict(samples.errors),
            "first_error": samples.first_error,
            "calls_per_s": samples.ok / samples.wall_s if samples.wall_s else 0.0,
            "latency_ms": summary_ms(samples.latency_s),
            "cpu_ms_per_call": cpu_total * 1000 / samples.ok if samples.ok else math.nan,
            "rss_quarters_mb": rss,
            "peak_rss_mb": peak_rss_mb(proxy.child.pid),
        }
