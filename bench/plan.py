"""What a run measures: the sidecar variants, the systems and the scenarios, full or quick.

A *system* is one way of making a call: `direct` (aiohttp to the mock upstream),
`tether-grpc` (the SDK's AsyncClient to the sidecar), `tether-http` (aiohttp to the sidecar's
OpenAI-compatible front), `litellm` (aiohttp to the LiteLLM proxy), and the transport floor
`floor-grpc` / `floor-http` (the same two clients to `bench.floor`, a bare gRPC and HTTP
proxy without any Tether logic; unary calls without the journal only). A scenario runs its
systems in alternating rounds against the sidecar *variant* it names.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DIRECT, GRPC, HTTP, LITELLM = "direct", "tether-grpc", "tether-http", "litellm"
TETHER_SYSTEMS = (GRPC, HTTP)
FLOOR_GRPC, FLOOR_HTTP = "floor-grpc", "floor-http"
FLOOR_SYSTEMS = (FLOOR_GRPC, FLOOR_HTTP)
FLOOR = "floor"  # the name of the floor's process among the proxies
# (floor system, the Tether system on the same transport)
FLOOR_PAIRS = ((FLOOR_GRPC, GRPC), (FLOOR_HTTP, HTTP))


@dataclass(frozen=True)
class Variant:
    """One sidecar process: which policies, journal and telemetry it runs with."""

    name: str
    journal: str = "none"  # none | full | normal (SQLite synchronous)
    policies: bool = True  # breaker, retry, rate limit (set high), bulkhead
    telemetry: bool = True  # spans exported to the harness's OTLP receiver


MAIN = Variant("main")
BARE = Variant("bare", policies=False, telemetry=False)
JOURNAL_FULL = Variant("journal-full", journal="full")
JOURNAL_NORMAL = Variant("journal-normal", journal="normal")


@dataclass(frozen=True)
class Scenario:
    """Systems compared side by side, in alternating rounds, under one load shape."""

    key: str
    title: str
    concurrency: int
    calls: int  # per system, over all rounds
    variant: Variant = MAIN
    stream: bool = False
    systems: tuple[str, ...] = (DIRECT, GRPC, HTTP, LITELLM)

    def __post_init__(self) -> None:
        floor = set(self.systems) & set(FLOOR_SYSTEMS)
        if floor and (self.stream or self.variant.journal != "none"):
            raise ValueError(f"{self.key}: the floor proxies answer unary calls without journal")

    @property
    def latency(self) -> bool:
        """A latency scenario (concurrency 1) rather than a throughput one."""
        return self.concurrency == 1


@dataclass(frozen=True)
class Plan:
    """Everything one run does."""

    mode: str  # full | quick
    scenarios: tuple[Scenario, ...]
    rounds: int
    warmup_calls: int
    round_max_s: float  # a round stops early after this long (a slow proxy: LiteLLM)
    memory_calls: int = 0  # the 100k-call memory run; 0: none
    profile_s: float = 0.0  # py-spy under c=32 load; 0: none
    startup_tries: int = 1  # starts of the first sidecar variant (the median is reported)
    with_litellm: bool = False
    variants: tuple[Variant, ...] = field(default=())

    def systems(self) -> set[str]:
        return {system for scenario in self.scenarios for system in scenario.systems}

    @property
    def floor(self) -> bool:
        """Does a scenario call the transport floor (`bench.floor` is started)?"""
        return bool(self.systems() & set(FLOOR_SYSTEMS))


# The unary scenarios without the journal also measure the transport floor.
WITH_FLOOR = (DIRECT, FLOOR_GRPC, FLOOR_HTTP, GRPC, HTTP, LITELLM)


def _full() -> list[Scenario]:
    s, only_tether, full, normal = Scenario, (DIRECT, GRPC, HTTP), JOURNAL_FULL, JOURNAL_NORMAL
    return [
        s("c1", "latency, c=1, unary", 1, 1500, systems=WITH_FLOOR),
        s("c1-bare", "latency, c=1, no policies or telemetry", 1, 1500, BARE, systems=only_tether),
        s("c1-jfull", "latency, c=1, journal FULL", 1, 1500, full, systems=only_tether),
        s("c1-jnormal", "latency, c=1, journal NORMAL", 1, 1500, normal, systems=only_tether),
        s("c1-stream", "first chunk, c=1, streaming", 1, 1000, stream=True),
        s("c32", "throughput, c=32, unary", 32, 6000, systems=WITH_FLOOR),
        s("c32-jfull", "throughput, c=32, journal FULL", 32, 6000, full, systems=only_tether),
        s("c32-jnormal", "throughput, c=32, journal NORMAL", 32, 6000, normal, systems=only_tether),
        s("c32-stream", "first chunk, c=32, streaming", 32, 3000, stream=True),
        s("c128", "throughput, c=128, unary", 128, 6000),
    ]


def _quick() -> list[Scenario]:
    s, only_tether, full = Scenario, (DIRECT, GRPC, HTTP), JOURNAL_FULL
    with_floor = tuple(x for x in WITH_FLOOR if x != LITELLM)
    return [
        s("c1", "latency, c=1, unary", 1, 400, systems=with_floor),
        s("c1-jfull", "latency, c=1, journal FULL", 1, 400, full, systems=only_tether),
        s("c1-stream", "first chunk, c=1, streaming", 1, 200, stream=True, systems=only_tether),
        s("c32", "throughput, c=32, unary", 32, 2000, systems=with_floor),
        s("c32-jfull", "throughput, c=32, journal FULL", 32, 2000, full, systems=only_tether),
    ]


def make_plan(
    *,
    quick: bool,
    with_litellm: bool,
    calls: int | None = None,
    memory_calls: int | None = None,
    profile: bool = True,
    only: list[str] | None = None,
) -> Plan:
    """The plan of a full or quick run; `calls` overrides every scenario's call count."""
    scenarios = _quick() if quick else _full()
    if only:
        unknown = set(only) - {s.key for s in _full() + _quick()}
        if unknown:
            raise ValueError(f"unknown scenarios: {', '.join(sorted(unknown))}")
        scenarios = [s for s in _full() if s.key in only]
    if not with_litellm:
        scenarios = [
            replace(s, systems=tuple(x for x in s.systems if x != LITELLM)) for s in scenarios
        ]
    if calls is not None:
        scenarios = [replace(s, calls=max(calls, s.concurrency * 2)) for s in scenarios]
    memory = (0 if quick else 100_000) if memory_calls is None else memory_calls
    profile_s = 0.0 if quick or not profile else 8.0
    variants = tuple(dict.fromkeys(s.variant for s in scenarios))
    if (memory or profile_s) and JOURNAL_FULL not in variants:
        variants += (JOURNAL_FULL,)  # the memory run and the profile use it
    return Plan(
        mode="quick" if quick else "full",
        scenarios=tuple(scenarios),
        rounds=2 if quick else 4,
        warmup_calls=100 if quick else 300,
        round_max_s=2.0 if quick else 3.0,
        memory_calls=memory,
        profile_s=profile_s,
        startup_tries=1 if quick else 3,
        with_litellm=with_litellm,
        variants=variants,
    )
