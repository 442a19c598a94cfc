import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CallKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CALL_KIND_UNSPECIFIED: _ClassVar[CallKind]
    CALL_KIND_MODEL: _ClassVar[CallKind]
    CALL_KIND_TOOL: _ClassVar[CallKind]
CALL_KIND_UNSPECIFIED: CallKind
CALL_KIND_MODEL: CallKind
CALL_KIND_TOOL: CallKind

class Usage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "total_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    total_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ...) -> None: ...

class CallRequest(_message.Message):
    __slots__ = ("upstream", "kind", "operation", "payload", "run_id", "idempotency_key", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    kind: CallKind
    operation: str
    payload: bytes
    run_id: str
    idempotency_key: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, upstream: _Optional[str] = ..., kind: _Optional[_Union[CallKind, str]] = ..., operation: _Optional[str] = ..., payload: _Optional[bytes] = ..., run_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CallResponse(_message.Message):
    __slots__ = ("payload", "replayed", "attempts", "usage", "upstream_status", "upstream", "idempotency_key")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_STATUS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    replayed: bool
    attempts: int
    usage: Usage
    upstream_status: int
    upstream: str
    idempotency_key: str
    def __init__(self, payload: _Optional[bytes] = ..., replayed: _Optional[bool] = ..., attempts: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., upstream_status: _Optional[int] = ..., upstream: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class StreamChunk(_message.Message):
    __slots__ = ("data", "index", "final", "replayed", "attempts", "usage", "upstream_status", "upstream")
    DATA_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_STATUS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    index: int
    final: bool
    replayed: bool
    attempts: int
    usage: Usage
    upstream_status: int
    upstream: str
    def __init__(self, data: _Optional[bytes] = ..., index: _Optional[int] = ..., final: _Optional[bool] = ..., replayed: _Optional[bool] = ..., attempts: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., upstream_status: _Optional[int] = ..., upstream: _Optional[str] = ...) -> None: ...

class BeginCallRequest(_message.Message):
    __slots__ = ("upstream", "kind", "operation", "payload", "run_id", "idempotency_key", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    upstream: str
    kind: CallKind
    operation: str
    payload: bytes
    run_id: str
    idempotency_key: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, upstream: _Optional[str] = ..., kind: _Optional[_Union[CallKind, str]] = ..., operation: _Optional[str] = ..., payload: _Optional[bytes] = ..., run_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BeginCallResponse(_message.Message):
    __slots__ = ("call_id", "replayed", "payload", "usage", "error", "idempotency_key")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    replayed: bool
    payload: bytes
    usage: Usage
    error: CallError
    idempotency_key: str
    def __init__(self, call_id: _Optional[str] = ..., replayed: _Optional[bool] = ..., payload: _Optional[bytes] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., error: _Optional[_Union[CallError, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class CallError(_message.Message):
    __slots__ = ("type", "message", "status", "retryable")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    type: str
    message: str
    status: int
    retryable: bool
    def __init__(self, type: _Optional[str] = ..., message: _Optional[str] = ..., status: _Optional[int] = ..., retryable: _Optional[bool] = ...) -> None: ...

class EndCallRequest(_message.Message):
    __slots__ = ("call_id", "payload", "error", "usage")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    payload: bytes
    error: CallError
    usage: Usage
    def __init__(self, call_id: _Optional[str] = ..., payload: _Optional[bytes] = ..., error: _Optional[_Union[CallError, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class EndCallResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("run_id", "step", "state", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    state: bytes
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., state: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("step", "saved_at")
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAVED_AT_FIELD_NUMBER: _ClassVar[int]
    step: int
    saved_at: _timestamp_pb2.Timestamp
    def __init__(self, step: _Optional[int] = ..., saved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LoadCheckpointRequest(_message.Message):
    __slots__ = ("run_id", "step")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class LoadCheckpointResponse(_message.Message):
    __slots__ = ("run_id", "step", "state", "metadata", "saved_at")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    SAVED_AT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    step: int
    state: bytes
    metadata: _containers.ScalarMap[str, str]
    saved_at: _timestamp_pb2.Timestamp
    def __init__(self, run_id: _Optional[str] = ..., step: _Optional[int] = ..., state: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ..., saved_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class RunInfo(_message.Message):
    __slots__ = ("run_id", "latest_step", "updated_at", "calls", "in_doubt")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    LATEST_STEP_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    IN_DOUBT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    latest_step: int
    updated_at: _timestamp_pb2.Timestamp
    calls: int
    in_doubt: int
    def __init__(self, run_id: _Optional[str] = ..., latest_step: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., calls: _Optional[int] = ..., in_doubt: _Optional[int] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[RunInfo]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[RunInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class JournalEntry(_message.Message):
    __slots__ = ("idempotency_key", "seq", "upstream", "operation", "state", "request_hash", "answered_by", "upstream_status", "attempts", "latency_ms", "replays", "started_at", "error_reason", "error_message", "retryable", "too_large", "stream", "in_flight")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_HASH_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    REPLAYS_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    TOO_LARGE_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    seq: int
    upstream: str
    operation: str
    state: str
    request_hash: str
    answered_by: str
    upstream_status: int
    attempts: int
    latency_ms: float
    replays: int
    started_at: _timestamp_pb2.Timestamp
    error_reason: str
    error_message: str
    retryable: bool
    too_large: bool
    stream: bool
    in_flight: bool
    def __init__(self, idempotency_key: _Optional[str] = ..., seq: _Optional[int] = ..., upstream: _Optional[str] = ..., operation: _Optional[str] = ..., state: _Optional[str] = ..., request_hash: _Optional[str] = ..., answered_by: _Optional[str] = ..., upstream_status: _Optional[int] = ..., attempts: _Optional[int] = ..., latency_ms: _Optional[float] = ..., replays: _Optional[int] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error_reason: _Optional[str] = ..., error_message: _Optional[str] = ..., retryable: _Optional[bool] = ..., too_large: _Optional[bool] = ..., stream: _Optional[bool] = ..., in_flight: _Optional[bool] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run", "entries")
    RUN_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    run: RunInfo
    entries: _containers.RepeatedCompositeFieldContainer[JournalEntry]
    def __init__(self, run: _Optional[_Union[RunInfo, _Mapping]] = ..., entries: _Optional[_Iterable[_Union[JournalEntry, _Mapping]]] = ...) -> None: ...

class ResolveCallRequest(_message.Message):
    __slots__ = ("run_id", "idempotency_key", "result", "retry")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    idempotency_key: str
    result: bytes
    retry: bool
    def __init__(self, run_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., result: _Optional[bytes] = ..., retry: _Optional[bool] = ...) -> None: ...

class ResolveCallResponse(_message.Message):
    __slots__ = ("entry",)
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    entry: JournalEntry
    def __init__(self, entry: _Optional[_Union[JournalEntry, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UpstreamStatus(_message.Message):
    __slots__ = ("name", "kind", "type", "breaker_state", "in_flight", "calls", "errors", "hits", "gauges", "queued", "retries", "fallbacks", "rejected")
    class GaugesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    BREAKER_STATE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    GAUGES_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RETRIES_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: CallKind
    type: str
    breaker_state: str
    in_flight: int
    calls: int
    errors: int
    hits: int
    gauges: _containers.ScalarMap[str, float]
    queued: int
    retries: int
    fallbacks: int
    rejected: int
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[CallKind, str]] = ..., type: _Optional[str] = ..., breaker_state: _Optional[str] = ..., in_flight: _Optional[int] = ..., calls: _Optional[int] = ..., errors: _Optional[int] = ..., hits: _Optional[int] = ..., gauges: _Optional[_Mapping[str, float]] = ..., queued: _Optional[int] = ..., retries: _Optional[int] = ..., fallbacks: _Optional[int] = ..., rejected: _Optional[int] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("version", "config_version", "serving", "uptime_s", "upstreams", "in_flight", "journal")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    UPSTREAMS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    JOURNAL_FIELD_NUMBER: _ClassVar[int]
    version: str
    config_version: str
    serving: bool
    uptime_s: float
    upstreams: _containers.RepeatedCompositeFieldContainer[UpstreamStatus]
    in_flight: int
    journal: JournalStatus
    def __init__(self, version: _Optional[str] = ..., config_version: _Optional[str] = ..., serving: _Optional[bool] = ..., uptime_s: _Optional[float] = ..., upstreams: _Optional[_Iterable[_Union[UpstreamStatus, _Mapping]]] = ..., in_flight: _Optional[int] = ..., journal: _Optional[_Union[JournalStatus, _Mapping]] = ...) -> None: ...

class JournalStatus(_message.Message):
    __slots__ = ("enabled", "backend", "replays", "in_doubt", "too_large", "joined", "commits", "writes")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REPLAYS_FIELD_NUMBER: _ClassVar[int]
    IN_DOUBT_FIELD_NUMBER: _ClassVar[int]
    TOO_LARGE_FIELD_NUMBER: _ClassVar[int]
    JOINED_FIELD_NUMBER: _ClassVar[int]
    COMMITS_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    backend: str
    replays: int
    in_doubt: int
    too_large: int
    joined: int
    commits: int
    writes: int
    def __init__(self, enabled: _Optional[bool] = ..., backend: _Optional[str] = ..., replays: _Optional[int] = ..., in_doubt: _Optional[int] = ..., too_large: _Optional[int] = ..., joined: _Optional[int] = ..., commits: _Optional[int] = ..., writes: _Optional[int] = ...) -> None: ...
