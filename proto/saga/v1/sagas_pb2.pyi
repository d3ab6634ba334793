from saga.v1 import log_pb2 as _log_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SagaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SAGA_STATE_UNSPECIFIED: _ClassVar[SagaState]
    RUNNING: _ClassVar[SagaState]
    COMPLETED: _ClassVar[SagaState]
    ABORTING: _ClassVar[SagaState]
    ABORTED: _ClassVar[SagaState]
    STUCK: _ClassVar[SagaState]

class VertexState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERTEX_STATE_UNSPECIFIED: _ClassVar[VertexState]
    PENDING: _ClassVar[VertexState]
    STARTED: _ClassVar[VertexState]
    DONE: _ClassVar[VertexState]
    FAILED: _ClassVar[VertexState]
    COMPENSATING: _ClassVar[VertexState]
    COMPENSATED: _ClassVar[VertexState]
    VERTEX_STUCK: _ClassVar[VertexState]
SAGA_STATE_UNSPECIFIED: SagaState
RUNNING: SagaState
COMPLETED: SagaState
ABORTING: SagaState
ABORTED: SagaState
STUCK: SagaState
VERTEX_STATE_UNSPECIFIED: VertexState
PENDING: VertexState
STARTED: VertexState
DONE: VertexState
FAILED: VertexState
COMPENSATING: VertexState
COMPENSATED: VertexState
VERTEX_STUCK: VertexState

class SubmitRequest(_message.Message):
    __slots__ = ("definition", "payload", "saga_id")
    DEFINITION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    definition: _log_pb2.SagaDefinition
    payload: bytes
    saga_id: str
    def __init__(self, definition: _Optional[_Union[_log_pb2.SagaDefinition, _Mapping]] = ..., payload: _Optional[bytes] = ..., saga_id: _Optional[str] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("saga_id", "created")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    created: bool
    def __init__(self, saga_id: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("saga_id",)
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    def __init__(self, saga_id: _Optional[str] = ...) -> None: ...

class VertexInfo(_message.Message):
    __slots__ = ("name", "state", "attempts", "compensation_attempts", "output", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    COMPENSATION_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    state: VertexState
    attempts: int
    compensation_attempts: int
    output: bytes
    error: str
    def __init__(self, name: _Optional[str] = ..., state: _Optional[_Union[VertexState, str]] = ..., attempts: _Optional[int] = ..., compensation_attempts: _Optional[int] = ..., output: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...

class SagaInfo(_message.Message):
    __slots__ = ("saga_id", "state", "name", "vertices", "records", "abort_reason", "started_unix_ms", "ended_unix_ms", "purged")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERTICES_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    ABORT_REASON_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    PURGED_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    state: SagaState
    name: str
    vertices: _containers.RepeatedCompositeFieldContainer[VertexInfo]
    records: _containers.RepeatedCompositeFieldContainer[_log_pb2.Record]
    abort_reason: str
    started_unix_ms: int
    ended_unix_ms: int
    purged: bool
    def __init__(self, saga_id: _Optional[str] = ..., state: _Optional[_Union[SagaState, str]] = ..., name: _Optional[str] = ..., vertices: _Optional[_Iterable[_Union[VertexInfo, _Mapping]]] = ..., records: _Optional[_Iterable[_Union[_log_pb2.Record, _Mapping]]] = ..., abort_reason: _Optional[str] = ..., started_unix_ms: _Optional[int] = ..., ended_unix_ms: _Optional[int] = ..., purged: _Optional[bool] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("state", "page_size", "page_token")
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state: SagaState
    page_size: int
    page_token: str
    def __init__(self, state: _Optional[_Union[SagaState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class SagaSummary(_message.Message):
    __slots__ = ("saga_id", "state", "name")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    state: SagaState
    name: str
    def __init__(self, saga_id: _Optional[str] = ..., state: _Optional[_Union[SagaState, str]] = ..., name: _Optional[str] = ...) -> None: ...

class ListReply(_message.Message):
    __slots__ = ("sagas", "next_page_token")
    SAGAS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sagas: _containers.RepeatedCompositeFieldContainer[SagaSummary]
    next_page_token: str
    def __init__(self, sagas: _Optional[_Iterable[_Union[SagaSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("saga_id", "from_seq")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    from_seq: int
    def __init__(self, saga_id: _Optional[str] = ..., from_seq: _Optional[int] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("seq", "record")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    seq: int
    record: _log_pb2.Record
    def __init__(self, seq: _Optional[int] = ..., record: _Optional[_Union[_log_pb2.Record, _Mapping]] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("saga_id", "reason")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    reason: str
    def __init__(self, saga_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("saga_id", "vertex", "reason")
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    VERTEX_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    vertex: str
    reason: str
    def __init__(self, saga_id: _Optional[str] = ..., vertex: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ResolveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
