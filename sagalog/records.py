"""Constructors for log records (the proposer chooses epoch and time; apply never does),
and two readers: a saga's definition, and a record's fields for people."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import json_format
from saga.v1 import log_pb2


def epoch(number: int, node_id: str, time_ms: int = 0) -> log_pb2.Record:
    return log_pb2.Record(
        epoch=number,
        time_unix_ms=time_ms,
        epoch_start=log_pb2.Epoch(number=number, node_id=node_id),
    )


def start_saga(
    saga_id: str,
    epoch: int,
    definition: log_pb2.SagaDefinition,
    payload: bytes = b"",
    time_ms: int = 0,
) -> log_pb2.Record:
    return log_pb2.Record(
        saga_id=saga_id,
        epoch=epoch,
        time_unix_ms=time_ms,
        start_saga=log_pb2.StartSaga(definition=definition, payload=payload),
    )


def start_t(
    saga_id: str, epoch: int, vertex: str, attempt: int, time_ms: int = 0
) -> log_pb2.Record:
    return log_pb2.Record(
        saga_id=saga_id,
        epoch=epoch,
        time_unix_ms=time_ms,
        start_t=log_pb2.StartT(vertex=vertex, attempt=attempt),
    )


def end_t(
    saga_id: str, epoch: int, vertex: str, output: bytes = b"", time_ms: int = 0
) -> log_pb2.Record:
    return log_pb2.Record(
        saga_id=saga_id,
        epoch=epoch,
        time_unix_ms=time_ms,
        end_t=log_pb2.EndT(vertex=vertex, output=output),
    )


def fail_t(
    saga_id: str,
    epoch: int,
    vertex: str,
    error: str,
    kind: int = log_pb2.BUSINESS,
    time_ms: int = 0,
) -> log_pb2.Record:
    return log_pb2.Record(
        saga_id=saga_id,
        epoch=epoch,
        time_unix_ms=time_ms,
        fail_t=log_pb2.FailT(vertex=vertex, error=error, kind=kind),  # type: ignore[arg-type]
    )


def abort_saga(saga_id: str, epoch: int, reason: str, time_ms: int = 0) -> log_pb2.Record:
    return log_pb2.Record(
        saga_id=saga_id,
        epoch=epoch,
        time_unix_ms=time_ms,
        abort_saga=log_pb2.AbortSaga(reason=reason),
    )


def start_c(
    saga_id: str, epoch: int, vertex: str, attempt: int, time_ms: int = 0
) -> log_pb2.Record:
    return log_pb2.Record(
        saga_id=saga_id,
        epoch=epoch,
        time_unix_ms=time_ms,
        start_c=log_pb2.StartC(vertex=vertex, attempt=attempt),
    )


def end_c(
    saga_id: str, epoch: int, vertex: str, resolved_by: str = "", time_ms: int = 0
) -> log_pb2.Record:
    return log_pb2.Record(
        saga_id=saga_id,
        epoch=epoch,
        time_unix_ms=time_ms,
        end_c=log_pb2.EndC(vertex=vertex, resolved_by=resolved_by),
    )


def stuck(saga_id: str, epoch: int, vertex: str, error: str, time_ms: int = 0) -> log_pb2.Record:
    return log_pb2.Record(
        saga_id=saga_id,
        epoch=epoch,
        time_unix_ms=time_ms,
        stuck=log_pb2.Stuck(vertex=vertex, error=error),
    )


def end_saga(saga_id: str, epoch: int, outcome: int, time_ms: int = 0) -> log_pb2.Record:
    return log_pb2.Record(
        saga_id=saga_id,
        epoch=epoch,
        time_unix_ms=time_ms,
        end_saga=log_pb2.EndSaga(outcome=outcome),  # type: ignore[arg-type]
    )


def purge_ended(ended_before_ms: int, max_sagas: int, time_ms: int = 0) -> log_pb2.Record:
    return log_pb2.Record(
        time_unix_ms=time_ms,
        purge_ended=log_pb2.PurgeEnded(ended_before_unix_ms=ended_before_ms, max_sagas=max_sagas),
    )


def log_format(version: int, time_ms: int = 0) -> log_pb2.Record:
    return log_pb2.Record(time_unix_ms=time_ms, log_format=log_pb2.LogFormat(version=version))


def member(node_id: str, incarnation: bytes) -> log_pb2.Record:
    return log_pb2.Record(member=log_pb2.Member(node_id=node_id, incarnation=incarnation))


def forget_member(node_id: str) -> log_pb2.Record:
    return log_pb2.Record(forget_member=log_pb2.ForgetMember(node_id=node_id))


def chain_definition(*names: str, endpoint: str = "127.0.0.1:1") -> log_pb2.SagaDefinition:
    """A definition whose vertices run one after another (handy in tests and benches)."""
    vertices = []
    for i, name in enumerate(names):
        vertices.append(
            log_pb2.Vertex(
                name=name,
                endpoint=endpoint,
                request=f"Do{name}",
                compensation=f"Undo{name}",
                depends_on=[names[i - 1]] if i else [],
                timeout_ms=1000,
                max_attempts=3,
            )
        )
    return log_pb2.SagaDefinition(name="chain", vertices=vertices)


def travel_shaped_definition(
    endpoint: str = "127.0.0.1:50061", max_attempts: int = 3
) -> log_pb2.SagaDefinition:
    """Hotel, Car and Flight in parallel, then Payment: the shape of the travel saga,
    all on one endpoint (test and benchmark data; cluster.testkit.travel has the real one)."""
    parallel = ["Hotel", "Car", "Flight"]
    vertices = [
        log_pb2.Vertex(
            name=name,
            endpoint=endpoint,
            request=f"Book{name}",
            compensation=f"Cancel{name}",
            depends_on=parallel if name == "Payment" else [],
            timeout_ms=2000,
            max_attempts=max_attempts,
        )
        for name in parallel + ["Payment"]
    ]
    return log_pb2.SagaDefinition(name="travel", vertices=vertices)


def completed_saga(saga_id: str, epoch: int, payload: bytes = b"{}") -> list[log_pb2.Record]:
    """The ten records of a travel-shaped saga that completed: test and benchmark
    data for the log alone."""
    records = [start_saga(saga_id, epoch, travel_shaped_definition(), payload)]
    for name in ("Hotel", "Car", "Flight", "Payment"):
        records.append(start_t(saga_id, epoch, name, 1))
        records.append(end_t(saga_id, epoch, name, f"{name[0]}-{saga_id}".encode()))
    records.append(end_saga(saga_id, epoch, log_pb2.OUTCOME_COMPLETED))
    return records


def definition_in(records: Iterable[log_pb2.Record]) -> log_pb2.SagaDefinition:
    """The definition a saga's StartSaga carries (empty when there is none, e.g.
    a purged saga)."""
    for record in records:
        if record.HasField("start_saga"):
            return record.start_saga.definition
    return log_pb2.SagaDefinition()


def fields_of(
    record: log_pb2.Record, output_as_text: bool = False
) -> tuple[str, dict[str, object]]:
    """A record for people to read: its body's name and fields, the definition left
    out (it is drawn, or shown apart), the payload as its length, an output as its
    length or, with `output_as_text`, as text."""
    body = record.WhichOneof("body") or ""
    if not body:
        return "", {}
    msg = getattr(record, body)
    fields = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    fields.pop("definition", None)
    if "payload" in fields:
        fields["payload"] = f"{len(msg.payload)} bytes"
    if "output" in fields:
        text = msg.output.decode(errors="replace")
        fields["output"] = text if output_as_text else f"{len(msg.output)} bytes"
    return body, fields
