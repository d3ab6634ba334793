from saga.v1 import log_pb2 as _log_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    FOLLOWER: _ClassVar[Role]
    CANDIDATE: _ClassVar[Role]
    LEADER: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
FOLLOWER: Role
CANDIDATE: Role
LEADER: Role

class NodeInfo(_message.Message):
    __slots__ = ("id", "raft_addr", "grpc_addr", "connected")
    ID_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDR_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDR_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    id: str
    raft_addr: str
    grpc_addr: str
    connected: bool
    def __init__(self, id: _Optional[str] = ..., raft_addr: _Optional[str] = ..., grpc_addr: _Optional[str] = ..., connected: _Optional[bool] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("id", "role", "term", "epoch", "leader_id", "leader_grpc_addr", "commit_index", "applied_index", "members", "registered", "ready", "in_office", "group", "groups", "member")
    class RegisteredEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    LEADER_GRPC_ADDR_FIELD_NUMBER: _ClassVar[int]
    COMMIT_INDEX_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    IN_OFFICE_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    id: str
    role: Role
    term: int
    epoch: int
    leader_id: str
    leader_grpc_addr: str
    commit_index: int
    applied_index: int
    members: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    registered: _containers.ScalarMap[str, bytes]
    ready: bool
    in_office: bool
    group: int
    groups: int
    member: bool
    def __init__(self, id: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., term: _Optional[int] = ..., epoch: _Optional[int] = ..., leader_id: _Optional[str] = ..., leader_grpc_addr: _Optional[str] = ..., commit_index: _Optional[int] = ..., applied_index: _Optional[int] = ..., members: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ..., registered: _Optional[_Mapping[str, bytes]] = ..., ready: _Optional[bool] = ..., in_office: _Optional[bool] = ..., group: _Optional[int] = ..., groups: _Optional[int] = ..., member: _Optional[bool] = ...) -> None: ...

class ProposeRequest(_message.Message):
    __slots__ = ("batch", "timeout_ms")
    BATCH_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    batch: bytes
    timeout_ms: int
    def __init__(self, batch: _Optional[bytes] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class ProposeReply(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _log_pb2.BatchResult
    def __init__(self, result: _Optional[_Union[_log_pb2.BatchResult, _Mapping]] = ...) -> None: ...

class DigestRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DigestReply(_message.Message):
    __slots__ = ("id", "applied_index", "sha256", "records", "sagas")
    ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_INDEX_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    SAGAS_FIELD_NUMBER: _ClassVar[int]
    id: str
    applied_index: int
    sha256: str
    records: int
    sagas: int
    def __init__(self, id: _Optional[str] = ..., applied_index: _Optional[int] = ..., sha256: _Optional[str] = ..., records: _Optional[int] = ..., sagas: _Optional[int] = ...) -> None: ...

class ReadSagaRequest(_message.Message):
    __slots__ = ("saga_id",)
    SAGA_ID_FIELD_NUMBER: _ClassVar[int]
    saga_id: str
    def __init__(self, saga_id: _Optional[str] = ...) -> None: ...

class ReadSagaReply(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[_log_pb2.Record]
    def __init__(self, records: _Optional[_Iterable[_Union[_log_pb2.Record, _Mapping]]] = ...) -> None: ...

class ForgetMemberRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class ForgetMemberReply(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _log_pb2.RecordResult
    def __init__(self, result: _Optional[_Union[_log_pb2.RecordResult, _Mapping]] = ...) -> None: ...

class TransferLeadershipRequest(_message.Message):
    __slots__ = ("to_node_id", "timeout_ms")
    TO_NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    to_node_id: str
    timeout_ms: int
    def __init__(self, to_node_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class TransferLeadershipReply(_message.Message):
    __slots__ = ("leader_id", "term")
    LEADER_ID_FIELD_NUMBER: _ClassVar[int]
    TERM_FIELD_NUMBER: _ClassVar[int]
    leader_id: str
    term: int
    def __init__(self, leader_id: _Optional[str] = ..., term: _Optional[int] = ...) -> None: ...

class ReadIndexRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReadIndexReply(_message.Message):
    __slots__ = ("index",)
    INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    def __init__(self, index: _Optional[int] = ...) -> None: ...

class ShardMapRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShardGroup(_message.Message):
    __slots__ = ("group", "hash_start", "hash_end", "grpc_addrs")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    HASH_START_FIELD_NUMBER: _ClassVar[int]
    HASH_END_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDRS_FIELD_NUMBER: _ClassVar[int]
    group: int
    hash_start: int
    hash_end: int
    grpc_addrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, group: _Optional[int] = ..., hash_start: _Optional[int] = ..., hash_end: _Optional[int] = ..., grpc_addrs: _Optional[_Iterable[str]] = ...) -> None: ...

class ShardMapReply(_message.Message):
    __slots__ = ("groups", "group")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[ShardGroup]
    group: int
    def __init__(self, groups: _Optional[_Iterable[_Union[ShardGroup, _Mapping]]] = ..., group: _Optional[int] = ...) -> None: ...

class AddNodeRequest(_message.Message):
    __slots__ = ("node_id", "raft_addr", "grpc_addr", "timeout_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RAFT_ADDR_FIELD_NUMBER: _ClassVar[int]
    GRPC_ADDR_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    raft_addr: str
    grpc_addr: str
    timeout_ms: int
    def __init__(self, node_id: _Optional[str] = ..., raft_addr: _Optional[str] = ..., grpc_addr: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class RemoveNodeRequest(_message.Message):
    __slots__ = ("node_id", "timeout_ms")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    timeout_ms: int
    def __init__(self, node_id: _Optional[str] = ..., timeout_ms: _Optional[int] = ...) -> None: ...

class MembershipReply(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, members: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...
