"""SagaView: one saga as its log tells it, folded for the coordinator and for clients.

Pure: built from records only. The phases come from the Saga Log's own transition
rules (`sagalog.transitions`), so the coordinator can never believe a state the
log would not accept.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from saga.v1 import log_pb2

from sagalog import codec
from sagalog.transitions import Comp, Event, Phase, Req, SagaState, apply, decide


@dataclass
class SagaView:
    saga_id: str
    state: SagaState = field(default_factory=SagaState)
    definition: log_pb2.SagaDefinition | None = None
    payload: bytes = b""
    vertices: dict[str, log_pb2.Vertex] = field(default_factory=dict)
    outputs: dict[str, bytes] = field(default_factory=dict)  # EndT outputs
    errors: dict[str, str] = field(default_factory=dict)  # FailT / Stuck errors
    abort_reason: str = ""
    outcome: int = log_pb2.OUTCOME_UNSPECIFIED
    started_ms: int = 0
    ended_ms: int = 0
    records: list[log_pb2.Record] = field(default_factory=list)

    @classmethod
    def from_records(cls, saga_id: str, records: Iterable[log_pb2.Record]) -> SagaView:
        view = cls(saga_id)
        for record in records:
            view.add(record)
        return view

    def add(self, record: log_pb2.Record) -> None:
        """Fold one record that the log accepted (in log order)."""
        event = codec.to_event(record).event
        if event is None:  # not a saga record; the log never stores one under a saga
            return
        self.records.append(record)
        self._fold(record, event)

    def ahead(self, proposed: Iterable[log_pb2.Record]) -> SagaView:
        """This saga as it will be once `proposed` (records sent to the log, not yet
        applied) are, to decide what follows them in the same entry. A copy: the view
        itself stays what the log holds. A record the rules would refuse here is
        skipped, as the log will refuse it. It keeps no `records`: only the rules' state
        and what the coordinator decides from."""
        view = SagaView(
            self.saga_id,
            state=self.state.copy(),
            definition=self.definition,
            payload=self.payload,
            vertices=self.vertices,
            outputs=dict(self.outputs),
            errors=dict(self.errors),
            abort_reason=self.abort_reason,
            outcome=self.outcome,
            started_ms=self.started_ms,
            ended_ms=self.ended_ms,
        )
        for record in proposed:
            event = codec.to_event(record).event
            if event is not None and decide(view.state, event).accepted:
                view._fold(record, event)
        return view

    def _fold(self, record: log_pb2.Record, event: Event) -> None:
        apply(self.state, event)
        body = codec.body_name(record)
        if body == "start_saga":
            self.definition = record.start_saga.definition
            self.payload = record.start_saga.payload
            self.vertices = {v.name: v for v in self.definition.vertices}
            self.started_ms = record.time_unix_ms
        elif body == "end_t":
            self.outputs[record.end_t.vertex] = record.end_t.output
        elif body == "fail_t":
            self.errors[record.fail_t.vertex] = record.fail_t.error
        elif body == "stuck":
            self.errors[record.stuck.vertex] = record.stuck.error
        elif body == "abort_saga":
            self.abort_reason = record.abort_saga.reason
        elif body == "end_saga":
            self.outcome = record.end_saga.outcome
            self.ended_ms = record.time_unix_ms

    @property
    def phase(self) -> Phase:
        return self.state.phase

    def req(self, vertex: str) -> Req:
        return self.state.vertices[vertex].req

    def comp(self, vertex: str) -> Comp:
        return self.state.vertices[vertex].comp

    @property
    def next_seq(self) -> int:
        return self.state.next_seq
