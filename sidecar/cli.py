"""The `tether` command: serve, check-config, status, demo."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sidecar.config import Config, ConfigError, default_config, load_config, secret_fields

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad configuration or arguments


def _load(path: str | None) -> Config:
    return load_config(path) if path else default_config()


def _print_problems(error: ConfigError) -> None:
    print(f"{error.source}: invalid configuration", file=sys.stderr)
    for problem in error.problems:
        print(f"  {problem}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a config file: `ok`, or each problem with its field path (exit 2)."""
    try:
        config = _load(args.config)
    except ConfigError as error:
        _print_problems(error)
        return EXIT_USAGE
    for warning in _missing_secrets(config):
        print(f"warning: {warning}", file=sys.stderr)
    print("ok")
    return EXIT_OK


def _missing_secrets(config: Config) -> list[str]:
    """Secrets the config names whose environment variables are not set here."""
    return [
        f"{path}: environment variable {env} is not set"
        for path, env in secret_fields(config)
        if not os.environ.get(env)
    ]


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the sidecar until SIGTERM/SIGINT, then drain and exit 0."""
    from sidecar.server import AddressInUseError, run
    from sidecar.telemetry.logging import setup_logging

    setup_logging(args.log_level, "text")
    try:
        config = _load(args.config)
        setup_logging(args.log_level, config.telemetry.log_format)
        return run(config)
    except ConfigError as error:
        _print_problems(error)
        return EXIT_USAGE
    except AddressInUseError as error:
        print(f"tether: {error}", file=sys.stderr)
        return EXIT_FAILURE


# CALLS: calls taken; HITS: requests the upstream adapter counted (UpstreamStatus.hits).
STATUS_COLUMNS = ("UPSTREAM", "KIND", "TYPE", "BREAKER", "FAILS", "INFL", "QUEUED", "CALLS",
                  "HITS", "ERRORS", "RETRY", "BUDGET", "FALLBK", "REFUSED", "LIMITS")  # fmt: skip
STATUS_ROW = (
    "{:<16} {:<5} {:<7} {:<9} {:>6} {:>6} {:>7} {:>6} {:>6} {:>7} {:>6} {:>7} {:>6} {:>7}  {}"
)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the status of a running sidecar."""
    import tether

    try:
        with tether.Client(args.address, timeout_s=args.timeout_s) as client:
            status = client.status()
    except tether.TetherError as error:
        print(f"tether: cannot get status from the sidecar: {error.message}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"tether {status.version}  config {status.config_version}  ", end="")
    print(f"serving={status.serving}  uptime {status.uptime_s:.0f} s  in flight {status.in_flight}")
    row = STATUS_ROW
    print(row.format(*STATUS_COLUMNS))
    for up in status.upstreams.values():
        g = up.gauges
        print(row.format(
            up.name, up.kind, up.type, up.breaker_state, _num(g, "breaker.failures"),
            up.in_flight, up.queued, up.calls, up.hits, up.errors, up.retries,
            _num(g, "retry.budget_left", "{:.1f}"), up.fallbacks, up.rejected, _limits(g),
        ))  # fmt: skip
    return EXIT_OK


def _num(gauges: Mapping[str, float], key: str, fmt: str = "{:.0f}") -> str:
    return fmt.format(gauges[key]) if key in gauges else "-"


def _limits(gauges: Mapping[str, float]) -> str:
    """Rate-limit levels: requests and tokens that could be taken now."""
    parts = []
    if "rate_limit.requests_available" in gauges:
        parts.append(f"req {gauges['rate_limit.requests_available']:.1f}")
    if "rate_limit.tokens_available" in gauges:
        parts.append(f"tok {gauges['rate_limit.tokens_available']:.0f}")
    return ", ".join(parts) or "-"


def cmd_runs(args: argparse.Namespace) -> int:
    """`tether runs list | show RUN_ID | resolve RUN_ID KEY (--result FILE | --retry)`."""
    import tether

    try:
        with tether.Client(args.address, timeout_s=args.timeout_s) as client:
            return int(RUNS[args.action](client, args))
    except tether.TetherError as error:
        print(f"tether: {error.message}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as error:
        print(f"tether: {error}", file=sys.stderr)
        return EXIT_USAGE


def _runs_list(client: Any, args: argparse.Namespace) -> int:
    row = "{:<36} {:>7} {:>11} {:>9}  {}"
    print(row.format("RUN", "CALLS", "CHECKPOINT", "IN DOUBT", "UPDATED"))
    for run in client.runs():
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.updated_at))
        step = str(run.latest_step) if run.latest_step >= 0 else "-"
        print(row.format(run.run_id, run.calls, step, run.in_doubt, updated))
    return EXIT_OK


def _runs_show(client: Any, args: argparse.Namespace) -> int:
    row = "{:>5}  {:<24} {:<14} {:<9} {:>8} {:>11} {:>8}  {}"
    print(row.format("STEP", "KEY", "UPSTREAM", "STATUS", "ATTEMPTS", "LATENCY ms", "REPLAYED",
                     "NOTE"))  # fmt: skip
    for e in client.journal(args.run_id):
        state = "in doubt" if e.in_doubt else ("running" if e.in_flight else e.state)
        note = e.error_reason or ("too large to replay" if e.too_large else "")
        if e.answered_by and e.answered_by != e.upstream:
            note = f"answered by {e.answered_by} {note}".strip()
        print(row.format(e.seq, e.key[:24], e.upstream, state, e.attempts,
                         f"{e.latency_ms:.1f}", e.replays, note))  # fmt: skip
    return EXIT_OK


def _runs_resolve(client: Any, args: argparse.Namespace) -> int:
    if bool(args.result) == bool(args.retry):
        print("tether: give exactly one of --result FILE or --retry", file=sys.stderr)
        return EXIT_USAGE
    result = Path(args.result).read_bytes() if args.result else None
    entry = client.resolve(args.run_id, args.key, result=result, retry=args.retry)
    if entry is None:
        print(f"{args.key}: forgotten; the next call with this key runs the upstream")
    else:
        print(f"{args.key}: {entry.state} (answered by {entry.answered_by})")
    return EXIT_OK


RUNS = {"list": _runs_list, "show": _runs_show, "resolve": _runs_resolve}


def cmd_top(args: argparse.Namespace) -> int:
    """A live terminal view of a running sidecar's golden signals."""
    import tether
    from sidecar.top import run_top

    try:
        return run_top(args.address, args.metrics, args.interval_s, args.once)
    except tether.TetherError as error:
        print(f"tether: cannot read the sidecar's status: {error.message}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the sidecar on embedded defaults, run the demo agent through it, stop it."""
    from sidecar.demo import run_demo

    return run_demo(agent=args.agent, steps=args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the sidecar")
    serve.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")
    serve.add_argument("--log-level", help="DEBUG, INFO, WARNING (default: $TETHER_LOG_LEVEL)")
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("config", nargs="?", help="YAML config file (default: embedded defaults)")
    check.set_defaults(func=cmd_check_config)

    status = sub.add_parser("status", help="show a running sidecar's status")
    status.add_argument("--address", help="sidecar address (default: $TETHER_ADDRESS)")
    status.add_argument("--timeout-s", type=float, default=5.0)
    status.set_defaults(func=cmd_status)

    top = sub.add_parser("top", help="live view of a running sidecar (rates, breakers, latency)")
    top.add_argument("--address", help="sidecar address (default: $TETHER_ADDRESS)")
    top.add_argument(
        "--metrics", help="metrics URL for latency, e.g. http://127.0.0.1:9464/metrics"
    )
    top.add_argument("--interval-s", type=float, default=1.0)
    top.add_argument("--once", action="store_true", help="print one reading and exit")
    top.set_defaults(func=cmd_top)

    runs = sub.add_parser("runs", help="inspect the journal: list, show, resolve")
    runs.add_argument("--address", help="sidecar address (default: $TETHER_ADDRESS)")
    runs.add_argument("--timeout-s", type=float, default=10.0)
    # the same options after the action too (`tether runs list --address X`); unset there,
    # they leave the value given before it
    after = argparse.ArgumentParser(add_help=False)
    after.add_argument("--address", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    after.add_argument("--timeout-s", type=float, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    actions = runs.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="runs in the journal", parents=[after])
    show = actions.add_parser("show", help="the calls of a run, in order", parents=[after])
    show.add_argument("run_id")
    resolve = actions.add_parser("resolve", help="settle an in-doubt call", parents=[after])
    resolve.add_argument("run_id")
    resolve.add_argument("key")
    resolve.add_argument("--result", metavar="FILE", help="record FILE's bytes as its answer")
    resolve.add_argument("--retry", action="store_true", help="let the next call run it again")
    runs.set_defaults(func=cmd_runs)

    demo = sub.add_parser("demo", help="run the demo agent through a sidecar on mock upstreams")
    demo.add_argument("--agent", default="examples/demo_agent.py", help="agent script to run")
    demo.add_argument("--steps", type=int, default=24, help="agent loop iterations")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
