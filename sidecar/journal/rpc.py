"""The journal's RPCs: checkpoints, runs, and resolving in-doubt calls."""

from __future__ import annotations

import time
from typing import Any

import grpc

from sidecar import errors
from sidecar.journal.base import Checkpoint, Completion, Entry, State
from sidecar.journal.recorder import Recorder
from sidecar.journal.wire import entry_pb, frame, run_pb, timestamp
from tether.v1 import sidecar_pb2 as pb

Context = grpc.aio.ServicerContext[Any, Any]
MAX_PAGE = 1000
DEFAULT_PAGE = 100


def _need(value: str, field: str) -> str:
    if not value:
        raise errors.InvalidRequestError(f"{field} is required", field=field)
    return value


def in_doubt(entry: Entry) -> bool:
    """Whether an entry awaits an operator: begun and never completed, or completed with an
    answer too large to keep (both refused with OUTCOME_UNKNOWN for non-idempotent calls)."""
    return entry.state is State.STARTED or (entry.state is State.DONE and entry.too_large)


class JournalRPCs:
    """Checkpoint and run RPCs over a `Recorder` (None: the journal is off)."""

    recorder: Recorder | None
    max_payload_bytes: int

    def _journal(self, what: str) -> Recorder:
        if self.recorder is None:
            raise errors.NotSupportedError(f"{what} needs the journal (journal.backend is none)")
        return self.recorder

    async def _save(self, request: pb.SaveCheckpointRequest) -> pb.SaveCheckpointResponse:
        recorder = self._journal("SaveCheckpoint")
        _need(request.run_id, "run_id")
        if len(request.state) > self.max_payload_bytes:
            raise errors.PayloadTooLargeError(len(request.state), self.max_payload_bytes)
        saved = Checkpoint(request.run_id, request.step, request.state, dict(request.metadata),
                           time.time())  # fmt: skip
        await recorder._io(recorder.store.save_checkpoint(saved))
        return pb.SaveCheckpointResponse(step=saved.step, saved_at=timestamp(saved.saved_at))

    async def _load(self, request: pb.LoadCheckpointRequest) -> pb.LoadCheckpointResponse:
        recorder = self._journal("LoadCheckpoint")
        _need(request.run_id, "run_id")
        step = request.step if request.HasField("step") else None
        found = await recorder._io(recorder.store.load_checkpoint(request.run_id, step))
        if found is None:
            which = "no checkpoint" if step is None else f"no checkpoint at step {step}"
            raise errors.NotFoundError(f"run {request.run_id!r} has {which}")
        return pb.LoadCheckpointResponse(
            run_id=found.run_id, step=found.step, state=found.state,
            metadata=found.metadata, saved_at=timestamp(found.saved_at),
        )  # fmt: skip

    async def _list(self, request: pb.ListRunsRequest) -> pb.ListRunsResponse:
        recorder = self._journal("ListRuns")
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        runs = await recorder._io(recorder.store.runs(size + 1, request.page_token))
        more = len(runs) > size
        runs = runs[:size]
        token = runs[-1].run_id if more and runs else ""
        return pb.ListRunsResponse(runs=[run_pb(r) for r in runs], next_page_token=token)

    async def _get_run(self, request: pb.GetRunRequest) -> pb.GetRunResponse:
        recorder = self._journal("GetRun")
        run_id = _need(request.run_id, "run_id")
        summary = await recorder._io(recorder.store.run(run_id))
        if summary is None:
            raise errors.NotFoundError(f"no run {run_id!r} in the journal")
        entries = await recorder._io(recorder.store.entries(run_id))
        running = recorder.running_keys(run_id)
        return pb.GetRunResponse(
            run=run_pb(summary), entries=[entry_pb(e, e.key in running) for e in entries]
        )

    async def _resolve(self, request: pb.ResolveCallRequest) -> pb.ResolveCallResponse:
        recorder = self._journal("ResolveCall")
        run_id, key = (
            _need(request.run_id, "run_id"),
            _need(request.idempotency_key, "idempotency_key"),
        )
        entry = await recorder._io(recorder.store.get(run_id, key))
        if entry is None:
            raise errors.NotFoundError(f"no call {key!r} in run {run_id!r}")
        if key in recorder.running_keys(run_id):
            raise errors.InvalidRequestError(
                f"call {key!r} of run {run_id!r} is running now; nothing to resolve",
                field="idempotency_key",
            )
        if not in_doubt(entry):
            raise errors.InvalidRequestError(
                f"call {key!r} of run {run_id!r} is {entry.state.value}, not in doubt: only a "
                "call begun and never completed (or whose answer was too large to keep) can "
                "be resolved",
                field="idempotency_key",
            )
        if request.WhichOneof("action") == "result":
            # A stream is journaled as its framed chunks: the result replays as one chunk.
            result = frame([request.result]) if entry.stream else request.result
            done = Completion(State.DONE, answered_by="operator", payload=result)
            await recorder._io(recorder.store.complete(entry, done))
        elif request.retry:
            await recorder._io(recorder.store.delete(run_id, key))
        else:
            raise errors.InvalidRequestError("give a result or retry", field="action")
        after = await recorder._io(recorder.store.get(run_id, key))
        return pb.ResolveCallResponse(entry=entry_pb(after, False) if after else None)
