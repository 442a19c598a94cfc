"""Conversions between journal records and the wire: responses, entries, stream framing."""

from __future__ import annotations

import struct
from collections.abc import Iterator

from google.protobuf import timestamp_pb2

from sidecar.journal.base import Completion, Entry, RunSummary, State
from sidecar.routes import CallResult
from sidecar.upstreams.base import Usage
from tether.v1 import sidecar_pb2 as pb

_LENGTH = struct.Struct(">I")


def frame(chunks: list[bytes]) -> bytes:
    """Chunks of a stream as one blob: each a 4-byte big-endian length, then its bytes."""
    return b"".join(_LENGTH.pack(len(chunk)) + chunk for chunk in chunks)


def unframe(blob: bytes) -> Iterator[bytes]:
    """The chunks `frame` joined, in order."""
    view, offset = memoryview(blob), 0
    while offset < len(blob):
        (size,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        yield bytes(view[offset : offset + size])
        offset += size


def timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def usage_pb(usage: Usage | None) -> pb.Usage:
    if usage is None:
        return pb.Usage()
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
    )


def entry_usage(entry: Entry) -> Usage:
    return Usage(entry.input_tokens, entry.output_tokens)


def completion_of(result: CallResult) -> Completion:
    """The journal record of a call that succeeded."""
    answer = result.response
    usage = answer.usage or Usage()
    return Completion(
        State.DONE,
        answered_by=result.upstream,
        upstream_status=answer.status,
        attempts=result.attempts,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        payload=answer.payload,
    )


def replayed_response(entry: Entry, key: str) -> pb.CallResponse:
    """A CallResponse answered from the journal, byte for byte."""
    return pb.CallResponse(
        payload=entry.payload or b"",
        replayed=True,
        attempts=0,
        usage=usage_pb(entry_usage(entry)),
        upstream_status=entry.upstream_status,
        upstream=entry.answered_by or entry.upstream,
        idempotency_key=key,
    )


def entry_pb(entry: Entry, in_flight: bool) -> pb.JournalEntry:
    error = entry.error
    return pb.JournalEntry(
        idempotency_key=entry.key,
        seq=entry.seq,
        upstream=entry.upstream,
        operation=entry.operation,
        state=entry.state.value,
        request_hash=entry.request_hash,
        answered_by=entry.answered_by,
        upstream_status=entry.upstream_status,
        attempts=entry.attempts,
        latency_ms=entry.latency_ms,
        replays=entry.replays,
        started_at=timestamp(entry.started_at),
        error_reason=error.reason if error else "",
        error_message=error.message if error else "",
        retryable=error.retryable if error else False,
        too_large=entry.too_large,
        stream=entry.stream,
        in_flight=in_flight,
    )


def run_pb(run: RunSummary) -> pb.RunInfo:
    return pb.RunInfo(
        run_id=run.run_id,
        latest_step=run.latest_step,
        updated_at=timestamp(run.updated_at),
        calls=run.calls,
        in_doubt=run.started,
    )
