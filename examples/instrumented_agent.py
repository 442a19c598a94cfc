"""An agent instrumented with the SDK's decorators: traced, guarded, and resumable.

    python examples/instrumented_agent.py --run-id trip-1 --steps 5 --crash-at 4   # dies
    python examples/instrumented_agent.py --run-id trip-1 --steps 5                # resumes

Each step looks a fact up (`lookup`, a `@tether.tool` guarded by the sidecar's `search`
upstream), asks the model through the SDK on the current run (`llm-backup`, a built-in
mock), and books something (`book`, a `@tether.tool` on `ledger` with a side effect: it
appends a line to the --ledger file). `--crash-at N` kills the process (SIGKILL) at the start
of step N. Run again with the same run id, the steps already done are answered from the
sidecar's journal: the tool functions do not run again (no line is written twice), the model
is not asked again, and the agent carries on where it died.

It runs against the sidecar's embedded defaults (`tether serve`, `make demo`); set
TETHER_ADDRESS to find the sidecar and OTEL_EXPORTER_OTLP_ENDPOINT to export its spans
(`invoke_agent trip-planner` > `execute_tool lookup` > the sidecar's own, one trace).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import tether

ran: Counter[str] = Counter()  # tool function bodies executed by this process
ledger = Path("ledger.jsonl")


@tether.tool("lookup", upstream="search", idempotent=True)
def lookup(topic: str) -> dict[str, Any]:
    """A read-only tool: running it twice is harmless (`idempotent=True`)."""
    ran["lookup"] += 1
    return {"topic": topic, "fact": f"{topic} has {len(topic)} letters"}


@tether.tool("book", upstream="ledger")
def book(step: int, what: str) -> dict[str, Any]:
    """A tool with a side effect, which a resumed run must not repeat."""
    ran["book"] += 1
    with ledger.open("a", encoding="utf-8") as out:
        out.write(json.dumps({"step": step, "what": what}) + "\n")
    return {"booked": what, "step": step}


def ask(run: tether.Run, model: str, question: str) -> str:
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": question}]}
    answer = run.model(model, body)
    return str(answer.json()["choices"][0]["message"]["content"])


@tether.agent("trip-planner", run_id=lambda args: args.run_id)
def plan(args: argparse.Namespace) -> tuple[int, int]:
    """The agent: its run is --run-id (else $TETHER_RUN_ID, else a new one)."""
    run = tether.current_run()
    assert isinstance(run, tether.Run)
    replayed = executed = 0
    for step in range(1, args.steps + 1):
        if step == args.crash_at:
            print(f"step {step}: crashing (SIGKILL)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        before = sum(ran.values())
        fact = lookup(f"city {step}")
        idea = ask(run, args.model, f"plan a visit: {fact['fact']}")
        booking = book(step, idea[:40])
        fresh = sum(ran.values()) > before
        executed, replayed = executed + fresh, replayed + (not fresh)
        print(f"step {step}: {'executed' if fresh else 'replayed'} "
              f"(booked {booking['booked']!r})", flush=True)  # fmt: skip
    print(f"run {run.run_id} complete: {replayed} steps replayed, {executed} executed; "
          f"tool functions ran {sum(ran.values())} times in this process")  # fmt: skip
    return replayed, executed


def main() -> int:
    global ledger
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-id", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--crash-at", type=int, default=0, help="SIGKILL self at this step")
    parser.add_argument("--model", default="llm-backup")
    parser.add_argument("--ledger", type=Path, default=ledger)
    args = parser.parse_args()
    ledger = args.ledger
    with tether.instrument(service_name="instrumented-agent"):
        plan(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
