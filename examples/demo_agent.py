"""A small agent loop through the Tether sidecar: model -> tool -> model, with faults.

Run it with `make demo` (which starts a sidecar on built-in mock upstreams), or point it at
your own sidecar with TETHER_ADDRESS. It uses the embedded defaults' upstream names:
`llm` (a model), `llm-flaky` (a model failing a quarter of its calls), `search` (a tool) and
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
    """Latency and outcome of every call, by upstream."""

    def __init__(self) -> None:
        self.latency_ms: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[str] = Counter()
        self.error_upstreams: Counter[str] = Counter()

    def timed(self, upstream: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(upstream, *args, **kwargs)
        except tether.TetherError as error:
            self.errors[type(error).__name__] += 1
            self.error_upstreams[upstream] += 1
            raise
        finally:
            self.latency_ms[upstream].append((time.perf_counter() - start) * 1000)


def ask_model(run: tether.Run, rec: Recorder, messages: list[dict[str, Any]], step: int) -> Any:
    """Every third step asks the flaky model first and falls back to `llm` when it fails."""
    body = {"model": "mock-gpt", "messages": messages, "tools": TOOLS}
    if step % 3 == 0:
        try:
            return rec.timed("llm-flaky", run.model, body).json()
        except tether.UpstreamUnavailableError as error:
            print(f"  (llm-flaky failed: {error.message}; falling back to llm)")
    return rec.timed("llm", run.model, body).json()


def agent_step(run: tether.Run, rec: Recorder, step: int) -> str:
    question = QUESTIONS[step % len(QUESTIONS)]
    messages: list[dict[str, Any]] = [{"role": "user", "content": question}]
    answer = ask_model(run, rec, messages, step)
    message = answer["choices"][0]["message"]
    for call in message.get("tool_calls") or []:
        result = rec.timed("search", run.tool, {"query": question}, name="search").json()
        messages += [message, {"role": "tool", "tool_call_id": call["id"], "content": str(result)}]
    final = ask_model(run, rec, messages, step + 1)
    return str(final["choices"][0]["message"]["content"])


def show_deadline(run: tether.Run, rec: Recorder) -> None:
    try:
        rec.timed("slow-tool", run.tool, {"q": "anything"}, timeout_s=0.2)
    except tether.DeadlineExceededError as error:
        print(f"  slow-tool hung and was cut at its deadline: {type(error).__name__}")


def show_stream(run: tether.Run, rec: Recorder) -> None:
    start = time.perf_counter()
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": "stream a short answer"}]}
    stream = run.stream_model("llm", body)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in stream if c["choices"])
    rec.latency_ms["llm (stream)"].append((time.perf_counter() - start) * 1000)
    print(f"  streamed: {text!r} ({stream.summary.usage.total_tokens} tokens)")


def summary(rec: Recorder, status: tether.Status, elapsed_s: float) -> None:
    total = sum(len(v) for v in rec.latency_ms.values())
    print(f"\n== summary: {total} calls in {elapsed_s:.2f} s, {sum(rec.errors.values())} errors ==")
    print(f"{'upstream':<14}{'calls':>6}{'errors':>8}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
    for name, values in sorted(rec.latency_ms.items()):
        p95 = (
            statistics.quantiles(values, n=20, method="inclusive")[-1]
            if len(values) > 1
            else values[0]
        )
        err = rec.error_upstreams[name]
        print(f"{name:<14}{len(values):>6}{err:>8}{statistics.median(values):>9.1f}"
              f"{p95:>9.1f}{max(values):>9.1f}")  # fmt: skip
    if rec.errors:
        print("errors by type: " + ", ".join(f"{k}={v}" for k, v in rec.errors.most_common()))
    print("sidecar view (GetStatus):")
    for up in status.upstreams.values():
        print(f"  {up.name:<12} calls={up.calls:<4} errors={up.errors:<4} upstream hits={up.hits}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    rec = Recorder()
    started = time.perf_counter()
    with tether.Client(timeout_s=5.0) as client:
        print(f"agent: connected to the sidecar at {client.target}")
        run = client.run(f"demo-{int(time.time())}")
        for step in range(args.steps):
            print(f"  step {step}: {agent_step(run, rec, step)}")
        show_stream(run, rec)
        show_deadline(run, rec)
        summary(rec, client.status(), time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
