"""Bytes <-> records: the only sagalog module that knows the protobuf schema.

Decoding never raises: bad bytes become a clear error string. Limits on what a
record may carry are named here and enforced on every replica at apply time, so
an oversized or malformed record is rejected the same way everywhere.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from google.protobuf.message import DecodeError
from saga.v1 import log_pb2

from sagalog.transitions import ATTEMPT_KINDS, Event, Kind, Outcome

BATCH_VERSION = 1

# Bounds. Each is enforced at apply; the gRPC layer checks them earlier for a
# friendlier error, but the log is the authority.
MAX_SAGA_ID_LEN = 128
SAGA_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]+$")
MAX_NODE_ID_LEN = 64
MAX_RECORDS_PER_BATCH = 4096
MAX_BATCH_BYTES = 8 * 1024 * 1024
MAX_VERTICES = 64
MAX_NAME_LEN = 128
MAX_PAYLOAD_BYTES = 256 * 1024
MAX_OUTPUT_BYTES = 64 * 1024
MAX_TEXT_LEN = 4096  # errors, reasons

_KIND_OF_BODY = {
    "start_saga": Kind.START_SAGA,
    "start_t": Kind.START_T,
    "end_t": Kind.END_T,
    "fail_t": Kind.FAIL_T,
    "abort_saga": Kind.ABORT_SAGA,
    "start_c": Kind.START_C,
    "end_c": Kind.END_C,
    "stuck": Kind.STUCK,
    "end_saga": Kind.END_SAGA,
}
# Per saga body, which of the bounded text fields and `attempt` its message has
# (read from the schema once: getattr with a default raises and catches inside,
# and to_event runs for every record on every replica).
_FIELDS_OF_BODY = {
    body: frozenset(log_pb2.Record.DESCRIPTOR.fields_by_name[body].message_type.fields_by_name)
    for body in _KIND_OF_BODY
}
_TEXT_FIELDS = {
    body: tuple(f for f in ("error", "resolved_by") if f in fields)
    for body, fields in _FIELDS_OF_BODY.items()
}
_HAS_ATTEMPT = frozenset(body for body, fields in _FIELDS_OF_BODY.items() if "attempt" in fields)
CLUSTER_BODIES = frozenset({"epoch_start", "member", "forget_member", "purge_ended", "log_format"})

OUTCOMES = {log_pb2.OUTCOME_COMPLETED: Outcome.COMPLETED, log_pb2.OUTCOME_ABORTED: Outcome.ABORTED}


def decode_batch(data: bytes) -> tuple[list[log_pb2.Record], str]:
    """Decode the replicated method's argument. Returns (records, error)."""
    if not isinstance(data, bytes | bytearray):
        return [], f"the batch must be bytes, got {type(data).__name__}"
    if len(data) > MAX_BATCH_BYTES:
        return [], f"the batch is {len(data)} bytes; the limit is {MAX_BATCH_BYTES}"
    batch = log_pb2.RecordBatch()
    try:
        batch.ParseFromString(bytes(data))
    except (DecodeError, ValueError) as exc:
        return [], f"the batch is not a valid RecordBatch: {exc}"
    if batch.version != BATCH_VERSION:
        return [], f"unsupported RecordBatch version {batch.version} (expected {BATCH_VERSION})"
    if len(batch.records) > MAX_RECORDS_PER_BATCH:
        return (
            [],
            f"the batch has {len(batch.records)} records; the limit is {MAX_RECORDS_PER_BATCH}",
        )
    return list(batch.records), ""


def encode_batch(records: list[log_pb2.Record]) -> bytes:
    batch = log_pb2.RecordBatch(version=BATCH_VERSION, records=records)
    return batch.SerializeToString(deterministic=True)


def encode_record(record: log_pb2.Record) -> bytes:
    return record.SerializeToString(deterministic=True)


def decode_record(data: bytes) -> log_pb2.Record:
    record = log_pb2.Record()
    record.ParseFromString(data)
    return record


def check_saga_id(saga_id: str) -> str:
    """Returns an error message, or "" when the id is acceptable."""
    if not saga_id:
        return "the saga id is empty"
    if len(saga_id) > MAX_SAGA_ID_LEN:
        return f"the saga id is {len(saga_id)} characters; the limit is {MAX_SAGA_ID_LEN}"
    if not SAGA_ID_RE.fullmatch(saga_id):
        return "the saga id may hold only letters, digits and . _ : -"
    return ""


def body_name(record: log_pb2.Record) -> str:
    return record.WhichOneof("body") or ""


def identity(record: log_pb2.Record) -> tuple[Kind, str, int] | None:
    """`to_event(record).event.identity` without building the event (which
    serialises the body): the coordinator asks for it for every record it sends
    and every record it sees applied. None for a record that is not a saga's."""
    body = body_name(record)
    kind = _KIND_OF_BODY.get(body)
    if kind is None:
        return None
    msg = getattr(record, body)
    attempt = msg.attempt if kind in ATTEMPT_KINDS else 0
    return (kind, getattr(msg, "vertex", ""), attempt)


@dataclass(frozen=True)
class Decoded:
    event: Event | None
    error: str = ""


def to_event(record: log_pb2.Record) -> Decoded:
    """Reduce a saga record to the transition rules' Event, checking its bounds."""
    body = body_name(record)
    kind = _KIND_OF_BODY.get(body)
    if kind is None:
        return Decoded(None, f"not a saga record (body {body or 'missing'!r})")
    msg = getattr(record, body)
    # What makes two records "the same record": the body, not the epoch or time it
    # was decided in (a retry on a new leader re-decides it). The saga is implicit.
    content = body.encode() + b"\0" + msg.SerializeToString(deterministic=True)
    if kind is Kind.START_SAGA:
        return _start_saga_event(msg, content)
    if kind is Kind.ABORT_SAGA:
        if len(msg.reason) > MAX_TEXT_LEN:
            return Decoded(None, f"AbortSaga: the reason exceeds {MAX_TEXT_LEN} characters")
        return Decoded(Event(kind, content=content))
    if kind is Kind.END_SAGA:
        outcome = OUTCOMES.get(msg.outcome)
        return Decoded(Event(kind, outcome=outcome, content=content))
    if not msg.vertex:
        return Decoded(None, f"{kind.value}: the vertex name is empty")
    attempt = msg.attempt if body in _HAS_ATTEMPT else 0
    if kind in (Kind.START_T, Kind.START_C) and attempt < 1:
        return Decoded(None, f"{kind.value}({msg.vertex}): attempt must be >= 1")
    if kind is Kind.END_T and len(msg.output) > MAX_OUTPUT_BYTES:
        return Decoded(
            None,
            f"EndT({msg.vertex}): the output is {len(msg.output)} bytes; "
            f"the limit is {MAX_OUTPUT_BYTES}",
        )
    for text_field in _TEXT_FIELDS[body]:
        if len(getattr(msg, text_field)) > MAX_TEXT_LEN:
            return Decoded(None, f"{kind.value}({msg.vertex}): {text_field} exceeds {MAX_TEXT_LEN}")
    return Decoded(Event(kind, vertex=msg.vertex, attempt=attempt, content=content))


def _start_saga_event(msg: log_pb2.StartSaga, content: bytes) -> Decoded:
    definition = msg.definition
    if len(msg.payload) > MAX_PAYLOAD_BYTES:
        return Decoded(
            None,
            f"StartSaga: the payload is {len(msg.payload)} bytes; the limit is {MAX_PAYLOAD_BYTES}",
        )
    if len(definition.vertices) > MAX_VERTICES:
        return Decoded(
            None,
            f"StartSaga: {len(definition.vertices)} vertices; the limit is {MAX_VERTICES}",
        )
    dag: dict[str, tuple[str, ...]] = {}
    for vertex in definition.vertices:
        if not vertex.name:
            return Decoded(None, "StartSaga: a vertex has an empty name")
        if len(vertex.name) > MAX_NAME_LEN:
            return Decoded(None, f"StartSaga: vertex name longer than {MAX_NAME_LEN} characters")
        if vertex.name in dag:
            return Decoded(None, f"StartSaga: duplicate vertex name {vertex.name!r}")
        dag[vertex.name] = tuple(vertex.depends_on)
    return Decoded(Event(Kind.START_SAGA, content=content, dag=dag))
