"""Tether's own Python per call, without the gRPC or HTTP hop: `python -m bench.hotpath`.

Builds the servicer in this process (policies on, every call traced and its spans encoded
as the OTLP exporter would, then dropped; journal off or SQLite), starts the instant mock
upstream (`bench.upstream_server`) in its own process, and calls `SidecarService.proxy`
sequentially: it prints this process's CPU per call (the sidecar's work plus the aiohttp
client's), and with `--profile` the functions cProfile finds most expensive. A helper for
finding what to fix on the hot path (issue 8); the harness (`python -m bench`) measures.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from bench.load import PAYLOAD, UPSTREAM
from sidecar.config import parse_config
from sidecar.server import build_recorder
from sidecar.service import SidecarService
from sidecar.telemetry.hub import Telemetry
from sidecar.upstreams.registry import build_upstreams
from tether.v1 import sidecar_pb2 as pb


class EncodingExporter(SpanExporter):
    """Encodes each batch as the OTLP exporter does, then drops it."""

    def __init__(self) -> None:
        try:  # the sidecar's encoder; the SDK's before it had one (A/B against older commits)
            from sidecar.telemetry.otlp import FastOTLPSpanExporter

            self.encode: Any = FastOTLPSpanExporter._translate_data.__get__(self._fast())
        except ImportError:
            from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

            self.encode = encode_spans
        self.spans = 0

    @staticmethod
    def _fast() -> Any:
        from sidecar.telemetry.otlp import SpanEncoder

        class Holder:
            _encoder = SpanEncoder()

        return Holder()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        encoded = self.encode(spans)  # the bytes sent (a request object before 2026-11-26)
        if not isinstance(encoded, bytes):
            encoded.SerializeToString()
        self.spans += len(spans)
        return SpanExportResult.SUCCESS


def config(upstream_url: str, journal: str, directory: Path) -> Any:
    store: dict[str, Any] = {"backend": "none"}
    if journal != "none":
        store = {"backend": "sqlite", "path": str(directory / "j.db"), "synchronous": journal}
    return parse_config({
        "upstreams": {UPSTREAM: {
            "kind": "model", "type": "openai", "base_url": f"{upstream_url}/v1",
            "policies": {"retry": {}, "breaker": {}, "bulkhead": {"max_in_flight": 512},
                         "rate_limit": {"requests_per_s": 1_000_000, "burst": 1_000_000}},
        }},
        "journal": store,
        "telemetry": {"traces": "off", "log_format": "text"},
    })  # fmt: skip


async def run(args: argparse.Namespace, upstream_url: str, directory: Path) -> None:
    cfg = config(upstream_url, args.journal, directory)
    exporter = EncodingExporter()
    telemetry = Telemetry(cfg, exporter=None if args.no_traces else exporter)
    upstreams = build_upstreams(cfg)
    for upstream in upstreams.values():
        await upstream.start()
    recorder = build_recorder(cfg)
    if recorder is not None:
        await recorder.store.open()
    service = SidecarService(cfg, upstreams, recorder=recorder, telemetry=telemetry)

    async def one(i: int) -> None:
        request = pb.CallRequest(upstream=UPSTREAM, payload=PAYLOAD)
        if recorder is not None:
            request.run_id, request.idempotency_key = "hot", f"k{i}"
        await service.proxy(request, "Call", (), 30.0)

    for i in range(args.warmup):
        await one(-1 - i)
    profile = cProfile.Profile() if args.profile else None
    cpu, wall = time.process_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    for i in range(args.calls):
        await one(i)
    if profile is not None:
        profile.disable()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    telemetry.shutdown()
    traces = "off" if args.no_traces else "on"
    print(f"{args.calls} calls, journal {args.journal}, traces {traces}: "
          f"{cpu / args.calls * 1e6:.0f} µs CPU and {wall / args.calls * 1e6:.0f} µs per call "
          "(this process)")  # fmt: skip
    if profile is not None:
        pstats.Stats(profile).sort_stats(args.sort).print_stats(args.top)
    if recorder is not None:
        await recorder.store.close()
    for upstream in upstreams.values():
        await upstream.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--journal", choices=("none", "full", "normal"), default="none")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-traces", action="store_true", help="metrics only, no spans")
    parser.add_argument("--sort", default="tottime")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    mock = subprocess.Popen([sys.executable, "-m", "bench.upstream_server"],
                            stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert mock.stdout is not None
        url = f"http://127.0.0.1:{int(mock.stdout.readline())}"
        with tempfile.TemporaryDirectory(prefix="tb-hot-") as tmp:
            import uvloop

            uvloop.run(run(args, url, Path(tmp)))
    finally:
        mock.terminate()
        mock.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
