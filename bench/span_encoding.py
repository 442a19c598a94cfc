"""What encoding a call's spans for OTLP costs: `python -m bench.span_encoding`.

Makes `--calls` calls' worth of the sidecar's two spans (the SERVER span of the call and the
CLIENT span of its attempt, with the attributes the sidecar sets), then encodes and serializes
them in batches of 512 (the BatchSpanProcessor's default) with the OTLP exporter's own encoder
and with the sidecar's (`sidecar.telemetry.otlp`), and prints the CPU per call of each; it
checks both give the same message.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sidecar.telemetry.otlp import SpanEncoder

BATCH = 512


def spans(calls: int) -> Sequence[ReadableSpan]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("tether.sidecar", "0.1.0")
    for i in range(calls):
        call = tracer.start_span("tether.Call", kind=SpanKind.SERVER, attributes={
            "tether.upstream": "llm", "gen_ai.operation.name": "chat",
            "gen_ai.request.stream": False, "gen_ai.conversation.id": f"run-{i // 100}",
            "tether.idempotency_key": f"step-{i}"})  # fmt: skip
        attempt = tracer.start_span("chat bench", trace.set_span_in_context(call),
                                    kind=SpanKind.CLIENT, attributes={
            "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
            "gen_ai.request.stream": False, "tether.upstream": "llm", "tether.attempt": 1,
            "gen_ai.request.model": "bench", "server.address": "127.0.0.1",
            "server.port": 8080, "gen_ai.conversation.id": f"run-{i // 100}"})  # fmt: skip
        attempt.set_attributes({"gen_ai.usage.input_tokens": 5, "gen_ai.usage.output_tokens": 1,
                                "gen_ai.response.model": "bench",
                                "gen_ai.response.id": f"chatcmpl-{i}",
                                "gen_ai.response.finish_reasons": ("stop",)})  # fmt: skip
        attempt.end()
        call.set_attribute("tether.replayed", False)
        call.end()
    return exporter.get_finished_spans()


def cost(encode: Callable[[Sequence[ReadableSpan]], Any], found: Sequence[ReadableSpan]) -> float:
    """CPU seconds to encode and serialize `found` in batches."""
    began = time.process_time()
    for start in range(0, len(found), BATCH):
        encode(found[start : start + BATCH]).SerializeToString()
    return time.process_time() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.span_encoding", description=__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    found = spans(args.calls)
    encoder = SpanEncoder()

    def fast(batch: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
        return ExportTraceServiceRequest.FromString(encoder.encode(batch))

    assert fast(found[:BATCH]) == encode_spans(found[:BATCH])
    for _ in range(args.rounds):  # alternating
        sdk_s, fast_s = cost(encode_spans, found), cost(fast, found)
        print(f"per call (2 spans): SDK encoder {sdk_s / args.calls * 1e6:.0f} µs, "
              f"sidecar encoder {fast_s / args.calls * 1e6:.0f} µs")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
