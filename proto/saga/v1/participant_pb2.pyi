from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StepRequest(_message.Message):
    __slots__ = ("saga_id", "vertex", "action", "payload", "idempotency_key", "request_key", "attempt", "epoch", "outputs", "sent_unix_ms")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    VERTEX_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_KEY_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    vertex: str
    action: str
    payload: bytes
    idempotency_key: str
    request_key: str
    attempt: int
    epoch: int
    outputs: _containers.ScalarMap[str, bytes]
    sent_unix_ms: int
    def __init__(self, saga_id: _Optional[str] = ..., vertex: _Optional[str] = ..., action: _Optional[str] = ..., payload: _Optional[bytes] = ..., idempotency_key: _Optional[str] = ..., request_key: _Optional[str] = ..., attempt: _Optional[int] = ..., epoch: _Optional[int] = ..., outputs: _Optional[_Mapping[str, bytes]] = ..., sent_unix_ms: _Optional[int] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("ok", "output", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    output: bytes
    error: str
    def __init__(self, ok: _Optional[bool] = ..., output: _Optional[bytes] = ..., error: _Optional[str] = ...) -> None: ...
