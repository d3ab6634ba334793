from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    OUTCOME_COMPLETED: _ClassVar[Outcome]
    OUTCOME_ABORTED: _ClassVar[Outcome]

class FailureKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FAILURE_KIND_UNSPECIFIED: _ClassVar[FailureKind]
    BUSINESS: _ClassVar[FailureKind]
    TRANSPORT_EXHAUSTED: _ClassVar[FailureKind]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    ACCEPTED: _ClassVar[Verdict]
    DUPLICATE: _ClassVar[Verdict]
    REJECTED: _ClassVar[Verdict]

class RejectCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECT_UNSPECIFIED: _ClassVar[RejectCode]
    REJECT_CONFLICT: _ClassVar[RejectCode]
    REJECT_STALE_EPOCH: _ClassVar[RejectCode]
    REJECT_OUT_OF_ORDER: _ClassVar[RejectCode]
    REJECT_INVALID: _ClassVar[RejectCode]
OUTCOME_UNSPECIFIED: Outcome
OUTCOME_COMPLETED: Outcome
OUTCOME_ABORTED: Outcome
FAILURE_KIND_UNSPECIFIED: FailureKind
BUSINESS: FailureKind
TRANSPORT_EXHAUSTED: FailureKind
VERDICT_UNSPECIFIED: Verdict
ACCEPTED: Verdict
DUPLICATE: Verdict
REJECTED: Verdict
REJECT_UNSPECIFIED: RejectCode
REJECT_CONFLICT: RejectCode
REJECT_STALE_EPOCH: RejectCode
REJECT_OUT_OF_ORDER: RejectCode
REJECT_INVALID: RejectCode

class Backoff(_message.Message):
    __slots__ = ("initial_ms", "max_ms", "multiplier")
    INITIAL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    initial_ms: int
    max_ms: int
    multiplier: float
    def __init__(self, initial_ms: _Optional[int] = ..., max_ms: _Optional[int] = ..., multiplier: _Optional[float] = ...) -> None: ...

class Vertex(_message.Message):
    __slots__ = ("name", "endpoint", "request", "compensation", "depends_on", "timeout_ms", "max_attempts", "backoff")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    COMPENSATION_FIELD_NUMBER: _ClassVar[int]
    DEPENDS_ON_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    BACKOFF_FIELD_NUMBER: _ClassVar[int]
    name: str
    endpoint: str
    request: str
    compensation: str
    depends_on: _containers.RepeatedScalarFieldContainer[str]
    timeout_ms: int
    max_attempts: int
    backoff: Backoff
    def __init__(self, name: _Optional[str] = ..., endpoint: _Optional[str] = ..., request: _Optional[str] = ..., compensation: _Optional[str] = ..., depends_on: _Optional[_Iterable[str]] = ..., timeout_ms: _Optional[int] = ..., max_attempts: _Optional[int] = ..., backoff: _Optional[_Union[Backoff, _Mapping]] = ...) -> None: ...

class SagaDefinition(_message.Message):
    __slots__ = ("name", "vertices")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERTICES_FIELD_NUMBER: _ClassVar[int]
    name: str
    vertices: _containers.RepeatedCompositeFieldContainer[Vertex]
    def __init__(self, name: _Optional[str] = ..., vertices: _Optional[_Iterable[_Union[Vertex, _Mapping]]] = ...) -> None: ...

class Epoch(_message.Message):
    __slots__ = ("number", "node_id")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    number: int
    node_id: str
    def __init__(self, number: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class StartSaga(_message.Message):
    __slots__ = ("definition", "payload")
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    definition: SagaDefinition
    payload: bytes
    def __init__(self, definition: _Optional[_Union[SagaDefinition, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class StartT(_message.Message):
    __slots__ = ("vertex", "attempt")
    VERTEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    vertex: str
    attempt: int
    def __init__(self, vertex: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class EndT(_message.Message):
    __slots__ = ("vertex", "output")
    VERTEX_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    vertex: str
    output: bytes
    def __init__(self, vertex: _Optional[str] = ..., output: _Optional[bytes] = ...) -> None: ...

class FailT(_message.Message):
    __slots__ = ("vertex", "error", "kind")
    VERTEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    vertex: str
    error: str
    kind: FailureKind
    def __init__(self, vertex: _Optional[str] = ..., error: _Optional[str] = ..., kind: _Optional[_Union[FailureKind, str]] = ...) -> None: ...

class AbortSaga(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class StartC(_message.Message):
    __slots__ = ("vertex", "attempt")
    VERTEX_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    vertex: str
    attempt: int
    def __init__(self, vertex: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class EndC(_message.Message):
    __slots__ = ("vertex", "resolved_by")
    VERTEX_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_BY_FIELD_NUMBER: _ClassVar[int]
    vertex: str
    resolved_by: str
    def __init__(self, vertex: _Optional[str] = ..., resolved_by: _Optional[str] = ...) -> None: ...

class Stuck(_message.Message):
    __slots__ = ("vertex", "error")
    VERTEX_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    vertex: str
    error: str
    def __init__(self, vertex: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class EndSaga(_message.Message):
    __slots__ = ("outcome",)
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("node_id", "incarnation")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    incarnation: bytes
    def __init__(self, node_id: _Optional[str] = ..., incarnation: _Optional[bytes] = ...) -> None: ...

class ForgetMember(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("saga_id", "epoch", "time_unix_ms", "epoch_start", "start_saga", "start_t", "end_t", "fail_t", "abort_saga", "start_c", "end_c", "stuck", "end_saga", "member", "forget_member", "purge_ended", "log_format")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_START_FIELD_NUMBER: _ClassVar[int]
    START_SAGA_FIELD_NUMBER: _ClassVar[int]
    START_T_FIELD_NUMBER: _ClassVar[int]
    END_T_FIELD_NUMBER: _ClassVar[int]
    FAIL_T_FIELD_NUMBER: _ClassVar[int]
    ABORT_SAGA_FIELD_NUMBER: _ClassVar[int]
    START_C_FIELD_NUMBER: _ClassVar[int]
    END_C_FIELD_NUMBER: _ClassVar[int]
    STUCK_FIELD_NUMBER: _ClassVar[int]
    END_SAGA_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    FORGET_MEMBER_FIELD_NUMBER: _ClassVar[int]
    PURGE_ENDED_FIELD_NUMBER: _ClassVar[int]
    LOG_FORMAT_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    epoch: int
    time_unix_ms: int
    epoch_start: Epoch
    start_saga: StartSaga
    start_t: StartT
    end_t: EndT
    fail_t: FailT
    abort_saga: AbortSaga
    start_c: StartC
    end_c: EndC
    stuck: Stuck
    end_saga: EndSaga
    member: Member
    forget_member: ForgetMember
    purge_ended: PurgeEnded
    log_format: LogFormat
    def __init__(self, saga_id: _Optional[str] = ..., epoch: _Optional[int] = ..., time_unix_ms: _Optional[int] = ..., epoch_start: _Optional[_Union[Epoch, _Mapping]] = ..., start_saga: _Optional[_Union[StartSaga, _Mapping]] = ..., start_t: _Optional[_Union[StartT, _Mapping]] = ..., end_t: _Optional[_Union[EndT, _Mapping]] = ..., fail_t: _Optional[_Union[FailT, _Mapping]] = ..., abort_saga: _Optional[_Union[AbortSaga, _Mapping]] = ..., start_c: _Optional[_Union[StartC, _Mapping]] = ..., end_c: _Optional[_Union[EndC, _Mapping]] = ..., stuck: _Optional[_Union[Stuck, _Mapping]] = ..., end_saga: _Optional[_Union[EndSaga, _Mapping]] = ..., member: _Optional[_Union[Member, _Mapping]] = ..., forget_member: _Optional[_Union[ForgetMember, _Mapping]] = ..., purge_ended: _Optional[_Union[PurgeEnded, _Mapping]] = ..., log_format: _Optional[_Union[LogFormat, _Mapping]] = ...) -> None: ...

class LogFormat(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class PurgeEnded(_message.Message):
    __slots__ = ("ended_before_unix_ms", "max_sagas")
    ENDED_BEFORE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_SAGAS_FIELD_NUMBER: _ClassVar[int]
    ended_before_unix_ms: int
    max_sagas: int
    def __init__(self, ended_before_unix_ms: _Optional[int] = ..., max_sagas: _Optional[int] = ...) -> None: ...

class Tombstone(_message.Message):
    __slots__ = ("outcome", "name", "started_unix_ms", "ended_unix_ms", "records", "start_fingerprint", "abort_reason", "purged_unix_ms")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    START_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    PURGED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    outcome: Outcome
    name: str
    started_unix_ms: int
    ended_unix_ms: int
    records: int
    start_fingerprint: bytes
    abort_reason: str
    purged_unix_ms: int
    def __init__(self, outcome: _Optional[_Union[Outcome, str]] = ..., name: _Optional[str] = ..., started_unix_ms: _Optional[int] = ..., ended_unix_ms: _Optional[int] = ..., records: _Optional[int] = ..., start_fingerprint: _Optional[bytes] = ..., abort_reason: _Optional[str] = ..., purged_unix_ms: _Optional[int] = ...) -> None: ...

class RecordBatch(_message.Message):
    __slots__ = ("version", "records")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    records: _containers.RepeatedCompositeFieldContainer[Record]
    def __init__(self, version: _Optional[int] = ..., records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ...) -> None: ...

class RecordResult(_message.Message):
    __slots__ = ("verdict", "reason", "seq", "purged", "code")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PURGED_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    reason: str
    seq: int
    purged: int
    code: RejectCode
    def __init__(self, verdict: _Optional[_Union[Verdict, str]] = ..., reason: _Optional[str] = ..., seq: _Optional[int] = ..., purged: _Optional[int] = ..., code: _Optional[_Union[RejectCode, str]] = ...) -> None: ...

class BatchResult(_message.Message):
    __slots__ = ("results", "error", "raft_index")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RAFT_INDEX_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[RecordResult]
    error: str
    raft_index: int
    def __init__(self, results: _Optional[_Iterable[_Union[RecordResult, _Mapping]]] = ..., error: _Optional[str] = ..., raft_index: _Optional[int] = ...) -> None: ...
