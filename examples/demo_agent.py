"""A small agent loop through the Tether sidecar: model -> tool -> model, through faults.

Run it with `make demo` (which starts a sidecar on built-in mock upstreams), or point it at
your own sidecar with TETHER_ADDRESS. It uses the embedded defaults' upstreams: `llm` (a model
that goes through a 1 s outage, with a breaker and `llm-backup` as fallback), `llm-flaky` (a
model failing a quarter of its calls, retried), `search` (a rate-limited tool) and
`slow-tool` (a tool that hangs, to show deadlines).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter, defaultdict
from typing import Any

import tether

TOOLS = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
QUESTIONS = [
    "What is the capital of France?",
    "How tall is Mount Everest?",
    "Who wrote Dune?",
    "What is the speed of light?",
]


class Recorder:
    """Latency and outcome of every call, and who answered it."""

    def __init__(self) -> None:
        self.latency_ms: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.error_upstreams: Counter[str] = Counter()
        self.answered_by: Counter[str] = Counter()
        self.breaker_states: list[str] = []

    def timed(self, upstream: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            result = fn(upstream, *args, **kwargs)
        except tether.TetherError as error:
            self.errors[type(error).__name__] += 1
            self.error_upstreams[upstream] += 1
            raise
        finally:
            self.latency_ms[upstream].append((time.perf_counter() - start) * 1000)
        if isinstance(result, tether.Result):
            self.answered_by[f"{upstream} -> {result.upstream}"] += 1
        return result


def ask_model(run: tether.Run, rec: Recorder, messages: list[dict[str, Any]], step: int) -> Any:
    """Every fifth step asks the flaky model, whose failures the sidecar retries."""
    body = {"model": "mock-gpt", "messages": messages, "tools": TOOLS}
    upstream = "llm-flaky" if step % 5 == 4 else "llm"
    return rec.timed(upstream, run.model, body)


def agent_step(run: tether.Run, rec: Recorder, step: int) -> str:
    question = QUESTIONS[step % len(QUESTIONS)]
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    first = ask_model(run, rec, messages, step)
    message = first.json()["choices"][0]["message"]
    for call in message.get("tool_calls") or []:
        result = rec.timed("search", run.tool, {"query": question}, name="search").json()
        messages += [message, {"role": "tool", "tool_call_id": call["id"], "content": str(result)}]
    final = ask_model(run, rec, messages, step)
    return f"{final.upstream:<10} attempts={final.attempts}"


def show_deadline(run: tether.Run, rec: Recorder) -> None:
    try:
        rec.timed("slow-tool", run.tool, {"q": "anything"}, timeout_s=0.2)
    except tether.DeadlineExceededError as error:
        print(f"  slow-tool hung and was cut at its deadline: {type(error).__name__}")


def show_stream(run: tether.Run, rec: Recorder) -> None:
    start = time.perf_counter()
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "stream a short answer"}]}
    with run.stream_model("llm", body) as stream:
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in stream if c["choices"]
        )
    rec.latency_ms["llm (stream)"].append((time.perf_counter() - start) * 1000)
    print(f"  streamed from {stream.summary.upstream}: {text!r}")


def latency_table(rec: Recorder) -> None:
    print(f"{'upstream':<14}{'calls':>6}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
    for name, values in sorted(rec.latency_ms.items()):
        p95 = statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else 0
        err = rec.error_upstreams[name]
        print(
            f"{name:<14}{len(values):>6}{err:>8}{statistics.median(values):>9.1f}"
            f"{p95 or values[0]:>9.1f}{max(values):>9.1f}"
        )


def policy_table(status: tether.Status) -> None:
    print("sidecar view (GetStatus):")
    head = f"  {'upstream':<12}{'calls':>6}{'errors':>7}{'retries':>8}{'fallbk':>7}"
    print(head + f"{'refused':>8}{'hits':>6}  breaker (transitions)")
    for up in status.upstreams.values():
        transitions = int(up.gauges.get("breaker.transitions", 0))
        print(
            f"  {up.name:<12}{up.calls:>6}{up.errors:>7}{up.retries:>8}{up.fallbacks:>7}"
            f"{up.rejected:>8}{up.hits:>6}  {up.breaker_state} ({transitions})"
        )


def summary(rec: Recorder, status: tether.Status, elapsed_s: float) -> None:
    total = sum(len(v) for v in rec.latency_ms.values())
    print(f"\n== summary: {total} calls in {elapsed_s:.2f} s, {sum(rec.errors.values())} errors ==")
    latency_table(rec)
    if rec.errors:
        print("errors by type: " + ", ".join(f"{k}={v}" for k, v in rec.errors.most_common()))
    print("answered by: " + ", ".join(f"{k}: {v}" for k, v in sorted(rec.answered_by.items())))
    phases = [
        s for i, s in enumerate(rec.breaker_states) if i == 0 or s != rec.breaker_states[i - 1]
    ]
    print("llm breaker over the run: " + " -> ".join(phases))
    policy_table(status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--think-s", type=float, default=0.04, help="pause between steps")
    args = parser.parse_args()
    rec = Recorder()
    started = time.perf_counter()
    with tether.Client(timeout_s=5.0) as client:
        print(f"agent: connected to the sidecar at {client.target}")
        run = client.run(f"demo-{int(time.time())}")
        for step in range(args.steps):
            try:
                line = agent_step(run, rec, step)
            except tether.TetherError as error:
                line = f"nobody: {type(error).__name__}: {error.message}"
            state = client.status().upstreams["llm"].breaker_state
            rec.breaker_states.append(state)
            print(f"  step {step:>2}: answered by {line}  llm breaker={state}")
            time.sleep(args.think_s)
        show_stream(run, rec)
        show_deadline(run, rec)
        summary(rec, client.status(), time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
