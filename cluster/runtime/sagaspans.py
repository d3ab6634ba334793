"""The spans a node exports (with --otlp-endpoint): one per participant call (a
request or compensation attempt), and one per saga, from StartSaga to EndSaga,
emitted by the node in office when the saga ends.

Their ids come from the saga (coordinator.tracecontext): the call span's id is the
parent the participant was sent in `traceparent`, and a new leader's spans join
the trace its predecessor began. A saga that ends just as leadership changes may
get its saga span from neither or both leaders (the same id, so a backend shows
one).
"""

from __future__ import annotations

from collections.abc import Callable

from opentelemetry import trace as otel_trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from saga.v1 import participant_pb2

from cluster.runtime.lifetimes import Lifetime
from cluster.tracing import export_to, parent_context, shut_down
from coordinator import core
from coordinator.calls import outcome_of
from coordinator.tracecontext import call_span_id, saga_span_id, saga_trace_id

MS = 1_000_000  # ns


class SagaSpans:
    def __init__(self, node_id: str, endpoint: str) -> None:
        self._provider, self._ids = export_to(endpoint, "sagacluster", node_id)
        self._tracer = self._provider.get_tracer("sagacluster.coordinator")
        self._node_id = node_id

    def call(
        self,
        request: participant_pb2.StepRequest,
        compensation: bool,
        reply: core.Reply,
        sent_ns: int,
        answered_ns: int,
        definition_of: Callable[[str], str | None],
    ) -> None:
        """A participant call answered (any thread)."""
        kind = "compensate" if compensation else "request"
        span_id = call_span_id(
            request.saga_id, request.vertex, compensation, request.attempt, request.epoch
        )
        self._ids.choose(None, span_id)
        span = self._tracer.start_span(
            f"{kind} {request.vertex} {request.action}",
            context=parent_context(
                saga_trace_id(request.saga_id), saga_span_id(request.saga_id), remote=False
            ),
            kind=SpanKind.CLIENT,
            start_time=sent_ns,
            attributes={
                "saga.id": request.saga_id,
                "saga.definition": definition_of(request.saga_id) or "",
                "saga.vertex": request.vertex,
                "saga.action": request.action,
                "saga.attempt": request.attempt,
                "saga.epoch": request.epoch,
                "saga.compensation": compensation,
                "saga.outcome": outcome_of(reply),
                "saga.node": self._node_id,
            },
        )
        if reply.ok is not True:
            span.set_status(Status(StatusCode.ERROR, reply.error[:200]))
        span.end(end_time=answered_ns)

    def sagas_ended(self, ended: list[Lifetime]) -> None:
        """The saga spans of sagas that just ended (Raft thread, node in office)."""
        for life in ended:
            self._ids.choose(saga_trace_id(life.saga_id), saga_span_id(life.saga_id))
            span = self._tracer.start_span(
                f"saga {life.definition}",
                context=otel_trace.set_span_in_context(otel_trace.INVALID_SPAN),
                kind=SpanKind.INTERNAL,
                start_time=life.started_unix_ms * MS,
                attributes={
                    "saga.id": life.saga_id,
                    "saga.definition": life.definition,
                    "saga.outcome": life.outcome,
                    "saga.node": self._node_id,
                },
            )
            if life.outcome != "completed":
                span.set_status(Status(StatusCode.ERROR, "aborted"))
            span.end(end_time=life.ended_unix_ms * MS)

    def close(self) -> None:
        shut_down(self._provider)
