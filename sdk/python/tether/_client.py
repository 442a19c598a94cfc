"""The synchronous client: `Client`, its per-run handle `Run`, and `Stream`."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import Any

import grpc
import orjson

from tether._errors import InternalError, NotFoundError, from_rpc_error
from tether._messages import (
    KIND_VALUES,
    MAX_MESSAGE_BYTES,
    Checkpoint,
    GuardState,
    JournalEntry,
    Result,
    RunInfo,
    Status,
    StreamSummary,
    begin_request,
    call_metadata,
    call_request,
    channel_options,
    checkpoint_request,
    end_request,
    load_request,
    resolve_request,
    resolve_target,
    traced,
)
from tether.v1 import sidecar_pb2 as pb
from tether.v1 import sidecar_pb2_grpc as pb_grpc

_HEALTH_METHOD = "/grpc.health.v1.Health/Check"


class Stream:
    """Chunks of a streamed model call, parsed from JSON; `summary` is filled at the end.

    Leaving the iteration early (or the `with` block) cancels the call, and the sidecar
    cancels the upstream request: no tokens are spent on an answer nobody reads.
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self.summary = StreamSummary()

    def __iter__(self) -> Iterator[Any]:
        try:
            for msg in self._call:
                if msg.final:
                    self.summary.take_final(msg)
                else:
                    yield orjson.loads(msg.data)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        finally:
            self.close()
        if not self.summary.done:
            raise InternalError("the sidecar ended the stream without its summary")

    def close(self) -> None:
        """Cancel the stream unless it already ended."""
        if not self.summary.done:
            self._call.cancel()

    cancel = close

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Guard:
    """A guarded call: admitted by the sidecar on entry, its outcome reported on exit."""

    def __init__(self, client: Client, request: pb.BeginCallRequest, timeout_s: float | None):
        self._client = client
        self._request = request
        self._timeout_s = timeout_s
        self.state = GuardState()

    def __enter__(self) -> GuardState:
        client = self._client
        try:
            answer = client._stub.BeginCall(
                self._request,
                timeout=self._timeout_s or client.timeout_s,
                metadata=traced(client._metadata),
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        self.state.take_begin(answer)
        return self.state

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        state, client = self.state, self._client
        if state.replayed:
            return  # the journal already holds the outcome
        request = end_request(state.call_id, exc, state.result, state.usage)
        try:
            client._stub.EndCall(request, timeout=10.0, metadata=client._metadata)
        except grpc.RpcError as error:
            if exc is None:
                raise from_rpc_error(error) from None


class Client:
    """Calls the sidecar over gRPC from synchronous code (thread-safe)."""

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        timeout_s: float | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        """`target`: argument, else $TETHER_ADDRESS, else `unix:tether.sock`.
        `max_message_bytes` bounds each message the channel sends or receives."""
        self.target = resolve_target(target)
        self.timeout_s = timeout_s
        self._metadata = call_metadata(token)
        options = channel_options(max_message_bytes)
        self._channel = grpc.insecure_channel(self.target, options=options)
        self._stub = pb_grpc.SidecarStub(self._channel)

    def _call(self, request: pb.CallRequest, timeout_s: float | None) -> Result:
        try:
            response = self._stub.Call(
                request, timeout=timeout_s or self.timeout_s, metadata=traced(self._metadata)
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return Result.from_pb(response)

    def model(
        self,
        upstream: str,
        payload: Any,
        *,
        operation: str = "chat",
        run_id: str = "",
        idempotency_key: str = "",
        labels: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Result:
        """One model call (`chat` by default) with `payload` as the upstream's JSON body."""
        request = call_request(
            upstream, pb.CALL_KIND_MODEL, operation, payload,
            run_id=run_id, idempotency_key=idempotency_key, labels=labels,
        )  # fmt: skip
        return self._call(request, timeout_s)

    def tool(
        self,
        upstream: str,
        payload: Any,
        *,
        name: str = "",
        run_id: str = "",
        idempotency_key: str = "",
        labels: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Result:
        """One tool call; `name` (default: the upstream's name) is the tool's operation."""
        request = call_request(
            upstream, pb.CALL_KIND_TOOL, name or upstream, payload,
            run_id=run_id, idempotency_key=idempotency_key, labels=labels,
        )  # fmt: skip
        return self._call(request, timeout_s)

    def stream_model(
        self,
        upstream: str,
        payload: Any,
        *,
        operation: str = "chat",
        run_id: str = "",
        idempotency_key: str = "",
        labels: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Stream:
        """A streamed model call: iterate the returned `Stream` for the chunks."""
        request = call_request(
            upstream, pb.CALL_KIND_MODEL, operation, payload,
            run_id=run_id, idempotency_key=idempotency_key, labels=labels,
        )  # fmt: skip
        call = self._stub.StreamCall(
            request, timeout=timeout_s or self.timeout_s, metadata=traced(self._metadata)
        )
        return Stream(call)

    def guard(
        self,
        upstream: str,
        payload: Any = b"",
        *,
        kind: str = "tool",
        name: str = "",
        run_id: str = "",
        idempotency_key: str = "",
        labels: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Guard:
        """Guard a call the agent makes itself: `with client.guard("tool", args) as g:`.

        Entry passes the upstream's rate limit, bulkhead and breaker (or raises their
        error); exit reports success, or the exception raised in the block, to them.
        """
        request = begin_request(
            upstream, KIND_VALUES[kind], name or upstream, payload,
            run_id=run_id, idempotency_key=idempotency_key, labels=labels,
        )  # fmt: skip
        return Guard(self, request, timeout_s)

    def status(self) -> Status:
        """The sidecar's status: upstreams, breaker states, in-flight counts, versions."""
        try:
            response = self._stub.GetStatus(
                pb.GetStatusRequest(), timeout=self.timeout_s or 10.0, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return Status.from_pb(response)

    def _rpc(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout_s or self.timeout_s or 30.0,
                          metadata=self._metadata)  # fmt: skip
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def save_checkpoint(
        self, run_id: str, state: Any, *, step: int, metadata: Mapping[str, str] | None = None
    ) -> int:
        """Save `state` (bytes, or JSON-able) as the run's checkpoint at `step`; durable."""
        request = checkpoint_request(run_id, state, step, metadata)
        return int(self._rpc(self._stub.SaveCheckpoint, request).step)

    def load_checkpoint(self, run_id: str, step: int | None = None) -> Checkpoint | None:
        """The run's latest checkpoint (or the one at `step`); None when there is none."""
        try:
            answer = self._rpc(self._stub.LoadCheckpoint, load_request(run_id, step))
        except NotFoundError:
            return None
        return Checkpoint.from_pb(answer)

    def runs(self, page_size: int = 100) -> list[RunInfo]:
        """Runs in the journal, by run id."""
        found, token = [], ""
        while True:
            request = pb.ListRunsRequest(page_size=page_size, page_token=token)
            answer = self._rpc(self._stub.ListRuns, request)
            found += [RunInfo.from_pb(r) for r in answer.runs]
            token = answer.next_page_token
            if not token:
                return found

    def journal(self, run_id: str) -> list[JournalEntry]:
        """The journaled calls of a run, in order."""
        answer = self._rpc(self._stub.GetRun, pb.GetRunRequest(run_id=run_id))
        return [JournalEntry.from_pb(e) for e in answer.entries]

    def resolve(
        self, run_id: str, key: str, *, result: Any | None = None, retry: bool = False
    ) -> JournalEntry | None:
        """Settle an in-doubt call: record `result` as its answer, or `retry` it."""
        answer = self._rpc(self._stub.ResolveCall, resolve_request(run_id, key, result, retry))
        return JournalEntry.from_pb(answer.entry) if answer.HasField("entry") else None

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the sidecar's health check says SERVING (or raise after `timeout_s`)."""
        from grpc_health.v1 import health_pb2

        check = self._channel.unary_unary(
            _HEALTH_METHOD,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            answer = check(health_pb2.HealthCheckRequest(), timeout=timeout_s, wait_for_ready=True)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        if answer.status != health_pb2.HealthCheckResponse.SERVING:
            raise InternalError(f"sidecar health is {answer.status}, not SERVING")

    def run(self, run_id: str) -> Run:
        """A handle whose calls carry `run_id` and step-derived idempotency keys."""
        return Run(self, run_id)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Run:
    """Calls bound to one run. Keys are `run_id:step`, a per-run counter, unless given.

    A restarted agent that makes the same calls in the same order gets the same keys, so the
    sidecar's journal can answer what already happened instead of doing it again.
    """

    def __init__(self, client: Client, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.step = 0  # calls made so far
        self._lock = threading.Lock()

    def next_key(self, given: str = "") -> str:
        """The key of the next call: `given`, else `run_id:step` (every call takes a step).
        Thread-safe: calls from several threads each take their own step. (Which call gets
        which step then depends on timing; a run replays only if its calls are made in the
        same order.)"""
        with self._lock:
            self.step += 1
            step = self.step
        return given or f"{self.run_id}:{step}"

    def save(
        self, state: Any, *, step: int | None = None, metadata: Mapping[str, str] | None = None
    ) -> int:
        """Checkpoint the agent's state (at the current step unless given); durable."""
        chosen = self.step if step is None else step
        return self.client.save_checkpoint(self.run_id, state, step=chosen, metadata=metadata)

    def load(self, step: int | None = None) -> Checkpoint | None:
        """The latest checkpoint of this run (or the one at `step`), or None."""
        return self.client.load_checkpoint(self.run_id, step)

    def model(self, upstream: str, payload: Any, **options: Any) -> Result:
        key = self.next_key(options.pop("idempotency_key", ""))
        return self.client.model(
            upstream, payload, run_id=self.run_id, idempotency_key=key, **options
        )

    def tool(self, upstream: str, payload: Any, **options: Any) -> Result:
        key = self.next_key(options.pop("idempotency_key", ""))
        return self.client.tool(
            upstream, payload, run_id=self.run_id, idempotency_key=key, **options
        )

    def stream_model(self, upstream: str, payload: Any, **options: Any) -> Stream:
        key = self.next_key(options.pop("idempotency_key", ""))
        return self.client.stream_model(
            upstream, payload, run_id=self.run_id, idempotency_key=key, **options
        )

    def guard(self, upstream: str, payload: Any = b"", **options: Any) -> Guard:
        key = self.next_key(options.pop("idempotency_key", ""))
        return self.client.guard(
            upstream, payload, run_id=self.run_id, idempotency_key=key, **options
        )

    def status(self) -> Status:
        return self.client.status()
