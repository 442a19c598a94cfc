"""An agent that survives being killed: its calls are journaled by the sidecar and replayed.

    python examples/resumable_agent.py --run-id job-1 --steps 20 --crash-at 11
    python examples/resumable_agent.py --run-id job-1 --steps 20     # resumes

Each step asks the model, calls a tool with side effects (`ledger` by default), and saves a
checkpoint. `--crash-at N` kills the process with SIGKILL at the start of step N, as a crash
would. Run again with the same run id: the SDK derives the same idempotency keys in the same
order, so the sidecar answers steps it already did from its journal (replayed, no side
effect repeated) and the agent carries on from where it died.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import tether


def step_once(run: tether.Run, step: int, model: str, tool: str) -> tuple[bool, Any]:
    """One step: model, then tool. Returns whether both answers came from the journal."""
    question = {"role": "user", "content": f"step {step}: what next?"}
    answer = run.model(model, {"model": "mock-gpt", "messages": [question]})
    effect = run.tool(tool, {"step": step, "action": "append"}, name="append")
    return answer.replayed and effect.replayed, effect.json()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--crash-at", type=int, default=0, help="SIGKILL self at this step")
    parser.add_argument("--model", default="llm-backup")
    parser.add_argument("--tool", default="ledger")
    args = parser.parse_args()
    replayed = executed = 0
    with tether.Client(timeout_s=10) as client:
        run = client.run(args.run_id)
        last = run.load()
        if last is not None:
            print(f"resuming run {args.run_id}: last checkpoint at step {last.json()['step']}")
        for step in range(1, args.steps + 1):
            if step == args.crash_at:
                print(f"step {step:>2}: crashing (SIGKILL)", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            from_journal, effect = step_once(run, step, args.model, args.tool)
            replayed += from_journal
            executed += not from_journal
            run.save({"step": step, "effect": effect})
            print(f"step {step:>2}: {'replayed' if from_journal else 'executed'}", flush=True)
    print(f"run {args.run_id} complete: {replayed} steps replayed, {executed} executed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
