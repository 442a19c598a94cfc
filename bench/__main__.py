"""The benchmark harness: `python -m bench [--quick] [--with-litellm] [...]` (`make bench`).

In one process tree and one run it starts an instant mock OpenAI upstream, a counting OTLP
trace receiver, Tether sidecars (one per variant: policies and telemetry on, journal off /
FULL / NORMAL, and a bare one), the transport floor (`bench.floor`: bare gRPC and HTTP
proxies without Tether logic) and, with `--with-litellm`, the LiteLLM proxy; then it
calls the upstream directly, through the sidecar's gRPC path (SDK) and HTTP front
(aiohttp), through the floor and through LiteLLM, side by side in alternating rounds, with
the proxies pinned to CPU 0 and everything else to CPU 1. It prints the tables and the
targets (PASS/MISS), writes `results.json` and `latency.png` (full mode: in `bench/`, with
the section of `bench/RESULTS.md` replaced; quick mode: in `bench/out/`, RESULTS.md
untouched).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import tether
from bench import litellm, machine, report, systems
from bench.load import Keys, grpc_call, http_session
from bench.plan import FLOOR, JOURNAL_FULL, LITELLM, Plan, Variant, make_plan
from bench.plot import plot
from bench.procs import LOAD_CPU, Child, can_pin, pin_self
from bench.profile import record
from bench.runner import Runner
from bench.targets import evaluate

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="fewer scenarios and calls (<60 s)")
    parser.add_argument("--with-litellm", action="store_true", help="also measure LiteLLM")
    parser.add_argument("--calls", type=int, help="calls per system in every scenario")
    parser.add_argument("--memory-calls", type=int, help="calls of the memory run (0: none)")
    parser.add_argument("--scenarios", help="only these scenarios (keys, comma-separated)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--out", type=Path, help="where results.json and latency.png go")
    parser.add_argument(
        "--record",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update bench/RESULTS.md (default: in full mode)",
    )
    parser.add_argument("--note", default="", help="a note for the RESULTS.md section")
    parser.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                        help="measure nothing: write the tables, plot and RESULTS.md section "
                        "of a saved results.json")  # fmt: skip
    parser.add_argument("--litellm-spec", default=litellm.DEFAULT_SPEC)
    parser.add_argument("--litellm-venv", type=Path, default=litellm.DEFAULT_VENV)
    return parser.parse_args(argv)


def setup_text(plan: Plan, spans: int) -> str:
    pinning = "proxies pinned to CPU 0; harness, load generator, mock upstream and OTLP "
    pinning += "receiver to CPU 1" if can_pin() else "(no pinning: fewer than 2 cores)"
    return (
        f"Setup: {pinning}. Upstream: `bench.upstream_server` (a bare asyncio HTTP/1.1 "
        "server, instant prebuilt answers). The project is byte-compiled first, as a wheel "
        "install does (LiteLLM's venv is compiled by pip). "
        f"{plan.rounds} alternating rounds per scenario after a warm-up; a round stops early "
        f"after {plan.round_max_s:.0f} s (LiteLLM). Sidecars: policies on (breaker, retry, "
        "rate limit at 1M/s, bulkhead of 512) and every call traced and exported to a real "
        f"OTLP/gRPC receiver ({spans:,} spans received); the `bare` variant has neither. gRPC "
        "over a unix socket with the SDK's AsyncClient; HTTP with the harness's keep-alive "
        "HTTP/1.1 client (`bench.load.HttpClient`) for direct, the sidecar's front and "
        "LiteLLM alike."
        + (f" {FLOOR_SETUP}" if plan.floor else "")
        + (f" {litellm.SETUP}" if plan.with_litellm else "")
    )


FLOOR_SETUP = (
    "Transport floor: `bench.floor`, one process pinned like the sidecars, a bare grpc.aio "
    "server (uvloop) answering the same `Sidecar/Call` and a bare aiohttp server answering "
    "`POST /v1/chat/completions`, each forwarding the body to the mock upstream with one "
    "shared aiohttp client and returning its bytes: no policies, journal, telemetry, auth or "
    "JSON parsing; `floor-grpc` and `floor-http` are called with the same clients as "
    "`tether-grpc` and `tether-http`."
)


async def measure(plan: Plan, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Start everything, run the plan, stop everything; the results (without targets)."""
    children: list[Child] = []
    result: dict[str, Any] = {"fsync_ms": machine.fsync_ms(tmp), "startup": {}}
    command = None
    if plan.with_litellm:
        command = await asyncio.to_thread(litellm.ensure_venv, args.litellm_venv, args.litellm_spec)
        result["litellm"] = {
            "spec": args.litellm_spec,
            "version": litellm.version(args.litellm_venv),
        }
    mock, upstream_url = systems.start_mock(tmp)
    otlp, endpoint = systems.start_otlp_sink(tmp)
    children += [mock]
    proxies: dict[str, systems.Proxy] = {}
    try:
        for variant in plan.variants:
            tries = plan.startup_tries if variant == plan.variants[0] else 1
            proxy, times = await _start_sidecar(variant, tries, upstream_url, endpoint, tmp)
            proxies[variant.name] = proxy
            children.append(proxy.child)
            result["startup"][proxy.name] = times
        if plan.floor:
            proxy = await systems.start_floor(upstream_url, tmp)
            proxies[FLOOR] = proxy
            children.append(proxy.child)
            result["startup"][FLOOR] = _startup([proxy])
            print(f"started {FLOOR} in {proxy.startup_s:.2f} s", flush=True)
        if command is not None:
            proxy = await litellm.start_litellm(command, upstream_url, tmp)
            proxies[LITELLM] = proxy
            children.append(proxy.child)
            result["startup"][LITELLM] = _startup([proxy])
            print(f"started litellm in {proxy.startup_s:.2f} s", flush=True)
        await _run_plan(plan, proxies, upstream_url, tmp, result)
    finally:
        for child in children:
            child.terminate()  # all at once: their drains overlap
        for child in children:
            child.stop()
        spans = systems.stop_otlp_sink(otlp)
    result["otlp_spans"] = spans
    result["setup"] = setup_text(plan, spans)
    return result


async def _start_sidecar(
    variant: Variant, tries: int, upstream_url: str, endpoint: str, tmp: Path
) -> tuple[systems.Proxy, dict[str, Any]]:
    """Start a sidecar `tries` times (all but the last stopped again): the running one and
    its start-up times (the median, and each try: one slow start on a busy machine is noise)."""
    started = []
    for attempt in range(tries):
        proxy = await systems.start_sidecar(variant, upstream_url, endpoint, tmp)
        started.append(proxy)
        print(f"started {variant.name} in {proxy.startup_s:.2f} s", flush=True)
        if attempt < tries - 1:
            proxy.child.stop()
    return started[-1], _startup(started)


def _startup(started: list[systems.Proxy]) -> dict[str, Any]:
    return {
        "first_call_s": statistics.median(p.startup_s for p in started),
        "first_http_call_s": statistics.median(p.http_startup_s for p in started),
        "tries_s": [p.startup_s for p in started],
    }


async def _run_plan(
    plan: Plan,
    proxies: dict[str, systems.Proxy],
    upstream_url: str,
    tmp: Path,
    result: dict[str, Any],
) -> None:
    grpc = {
        name: tether.AsyncClient(p.grpc_address, timeout_s=60)
        for name, p in proxies.items()
        if p.grpc_address
    }
    try:
        async with http_session() as session:
            runner = Runner(
                plan, upstream_url=upstream_url, proxies=proxies, session=session, grpc=grpc
            )
            result["scenarios"] = {}
            for scenario in plan.scenarios:
                began = time.perf_counter()
                found = await runner.scenario(scenario)
                result["scenarios"][scenario.key] = {
                    "title": scenario.title,
                    "concurrency": scenario.concurrency,
                    "stream": scenario.stream,
                    "variant": scenario.variant.name,
                    "calls_per_system": scenario.calls,
                    "systems": found,
                }
                print(f"{scenario.title}: {time.perf_counter() - began:.1f} s", flush=True)
            if plan.memory_calls:
                print(f"memory run: {plan.memory_calls:,} calls...", flush=True)
                result["memory"] = await runner.memory(plan.memory_calls, JOURNAL_FULL.name)
            if plan.profile_s:
                proxy = proxies[JOURNAL_FULL.name]
                call = grpc_call(grpc[JOURNAL_FULL.name], stream=False, keys=Keys("profile"))
                found_profile = await record(
                    proxy.child.pid, call, seconds=plan.profile_s, out=tmp / "profile.txt"
                )
                if found_profile:
                    result["profile"] = {"proxy": proxy.name, **found_profile}
    finally:
        for client in grpc.values():
            await client.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render:
        return render(args)
    plan = make_plan(
        quick=args.quick,
        with_litellm=args.with_litellm,
        calls=args.calls,
        memory_calls=args.memory_calls,
        profile=not args.no_profile,
        only=args.scenarios.split(",") if args.scenarios else None,
    )
    out = args.out or (HERE / "out" if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    pin_self(LOAD_CPU)
    result: dict[str, Any] = {
        "mode": plan.mode,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m bench " + shlex.join(argv),
        "note": args.note,
        "machine": machine.describe(),
        "versions": machine.versions(),
        "code": machine.code_under_test(),
    }
    result["byte_compiled"] = machine.compile_project(HERE.parent)
    with tempfile.TemporaryDirectory(prefix="tb-", dir="/tmp") as tmp:
        result |= _run_loop(measure(plan, args, Path(tmp)))
    result["machine"]["load_average_end"] = machine.load_average()
    result["elapsed_s"] = time.perf_counter() - started
    targets = evaluate(result)
    result["targets"] = targets
    print("\n" + report.console(result, targets), flush=True)
    failed = report.failures(result)
    for line in failed:
        print(f"ERRORS: {line}", flush=True)
    _write(result, targets, out, record=_should_record(args, plan, failed))
    print(f"took {result['elapsed_s']:.0f} s", flush=True)
    return 1 if failed else 0


def render(args: argparse.Namespace) -> int:
    """Tables, plot and RESULTS.md section of a saved run (targets evaluated anew)."""
    result = json.loads(args.render.read_text())
    targets = evaluate(result)
    result["targets"] = targets
    print(report.console(result, targets), flush=True)
    out = args.out or HERE
    out.mkdir(parents=True, exist_ok=True)
    _write(result, targets, out, record=args.record is not False)
    return 0


def _should_record(args: argparse.Namespace, plan: Plan, failed: list[str]) -> bool:
    """Update RESULTS.md? As asked; by default in full mode, and never after failed calls."""
    if args.record is not None:
        return bool(args.record)
    return plan.mode == "full" and not failed


def _write(
    result: dict[str, Any], targets: list[dict[str, Any]], out: Path, *, record: bool
) -> None:
    report.write_json(out / "results.json", result)
    drawn = plot(result, out / "latency.png")
    print(f"wrote {out / 'results.json'}" + (" and latency.png" if drawn else ""), flush=True)
    if record:
        png = "latency.png" if drawn and out == HERE else None
        report.update_results_md(HERE / "RESULTS.md", report.section(result, targets, png))
        print(f"updated {HERE / 'RESULTS.md'}", flush=True)


def _run_loop(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with the sidecar on POSIX
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    raise SystemExit(main())
