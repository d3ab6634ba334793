"""The Saga Execution Coordinator's decisions, as pure functions.

Theory of operation
-------------------
The driver (IO) keeps no state that matters: everything the coordinator knows is
in the log. For each saga it asks three questions, and this module answers them
from a `SagaView` (the folded log) plus the inputs the driver owns (epoch, time):

* `plan(view)`: which records can be logged now without waiting for anyone
  (StartT of vertices whose dependencies completed, StartC in reverse dependency
  order, EndSaga), and which participant calls must be outstanding (every request
  with a StartT and no end while running; every compensation with a StartC and
  no EndC). After a failover the new leader simply asks `plan` and re-sends what
  is outstanding: requests and compensations are idempotent.
* `on_reply(view, call, reply)`: the records a participant's answer leads to
  (EndT; FailT + AbortSaga; EndC) or, for a failure worth retrying, how long to
  wait before `retry`.
* `retry(view, call)`: the records that start the next attempt (StartT or StartC
  with attempt + 1, logged before the call is sent), or a plain re-send.

Rules encoded here (ARCHITECTURE.md, "The SEC's rules"): log before acting; a
business failure aborts; a transport failure is retried up to the vertex's
max_attempts, then aborts; on abort every vertex with a StartT is compensated, a
vertex only after its started dependents; compensations are retried forever with
capped backoff and the saga is marked Stuck after STUCK_AFTER_ATTEMPTS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from saga.v1 import log_pb2, participant_pb2

from coordinator.view import SagaView
from sagalog import codec
from sagalog import records as rec
from sagalog.transitions import Comp, Phase, Req, started

DEFAULT_TIMEOUT_MS = 5000
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BACKOFF = log_pb2.Backoff(initial_ms=100, max_ms=2000, multiplier=2.0)
# Compensations cannot give up: they back off up to this cap and go on.
COMPENSATION_BACKOFF_CAP_MS = 5000
STUCK_AFTER_ATTEMPTS = 5
# Each logged attempt is a record; past this many, a stuck compensation is re-sent
# under its last logged attempt, so a saga stuck for days does not grow its log.
MAX_LOGGED_COMPENSATION_ATTEMPTS = 20


@dataclass(frozen=True)
class Call:
    """A participant call: the request of `vertex`, or its compensation."""

    vertex: str
    compensation: bool
    attempt: int


@dataclass(frozen=True)
class Reply:
    """A participant's answer. ok=None: transport failure (error status, deadline)."""

    ok: bool | None
    output: bytes = b""
    error: str = ""


@dataclass(frozen=True)
class Plan:
    records: list[log_pb2.Record]
    calls: list[Call]


@dataclass(frozen=True)
class Response:
    records: list[log_pb2.Record]
    retry_after_ms: int | None = None  # ask `retry` after this long


def request_key(saga_id: str, vertex: str) -> str:
    """Idempotency key of a vertex's request: the same for every attempt, on any leader."""
    return f"{saga_id}/{vertex}/request"


def compensation_key(saga_id: str, vertex: str) -> str:
    return f"{saga_id}/{vertex}/compensation"


def timeout_ms(vertex: log_pb2.Vertex) -> int:
    return vertex.timeout_ms or DEFAULT_TIMEOUT_MS


def max_attempts(vertex: log_pb2.Vertex) -> int:
    return vertex.max_attempts or DEFAULT_MAX_ATTEMPTS


def backoff_ms(vertex: log_pb2.Vertex, attempt: int, cap_ms: int | None = None) -> int:
    """Wait after failed attempt `attempt` (1-based) before the next one."""
    b = vertex.backoff if vertex.HasField("backoff") else DEFAULT_BACKOFF
    initial = b.initial_ms or DEFAULT_BACKOFF.initial_ms
    cap = b.max_ms or DEFAULT_BACKOFF.max_ms
    if cap_ms is not None:
        cap = min(max(cap, initial), cap_ms)
    multiplier = b.multiplier or DEFAULT_BACKOFF.multiplier
    if not math.isfinite(multiplier) or multiplier < 1.0:
        # Submit refuses such a definition; a record proposed around it must not
        # crash the driver either.
        multiplier = DEFAULT_BACKOFF.multiplier
    return int(min(cap, initial * min(multiplier, 10.0) ** min(max(0, attempt - 1), 64)))


def plan(view: SagaView, epoch: int, now_ms: int) -> Plan:
    phase = view.phase
    if phase is Phase.RUNNING:
        return _plan_running(view, epoch, now_ms)
    if phase is Phase.ABORTING:
        return _plan_aborting(view, epoch, now_ms)
    return Plan([], [])


def plan_ahead(view: SagaView, proposed: list[log_pb2.Record], epoch: int, now_ms: int) -> Plan:
    """`plan` for a saga whose `proposed` records are on their way to the log: the
    records that follow them, to go in the same Raft entry (a saga's StartSaga with
    its roots' StartT, the last EndT a vertex waits for with the StartT it unblocks,
    the last end record with EndSaga), and the calls the *applied* log asks for.

    Log before acting still holds: a call is returned only when its StartT or StartC
    is in `view` (applied, so committed). Chaining is safe because the log checks
    every record against the state left by the records before it: if a proposed
    record is lost or refused, what was decided from it is refused too, and the
    next plan decides again."""
    ahead = view.ahead(proposed) if proposed else view
    records: list[log_pb2.Record] = []
    step = plan(ahead, epoch, now_ms)
    # Each step moves the saga forward or stops: a DAG of n vertices needs at most
    # one step per vertex and per saga-level record.
    for _ in range(2 * len(ahead.vertices) + 3):
        if not step.records:
            break
        following = ahead.ahead(step.records)
        if following.next_seq == ahead.next_seq:
            break  # the log would refuse them all: nothing to chain
        records.extend(step.records)
        ahead = following
        step = plan(ahead, epoch, now_ms)
    return Plan(records, [call for call in step.calls if _committed(view, call)])


def _committed(view: SagaView, call: Call) -> bool:
    """The StartT or StartC this call is made under is applied."""
    v = view.state.vertices.get(call.vertex)
    if v is None:
        return False
    if call.compensation:
        return v.comp in (Comp.STARTED, Comp.STUCK) and v.comp_attempt == call.attempt
    return v.req is Req.STARTED and v.req_attempt == call.attempt


def _plan_running(view: SagaView, epoch: int, now_ms: int) -> Plan:
    sid, state = view.saga_id, view.state
    records: list[log_pb2.Record] = []
    calls: list[Call] = []
    failed = [n for n, v in state.vertices.items() if v.req is Req.FAILED]
    if failed:
        # FailT and AbortSaga are logged in one batch; this only finishes the job
        # if a FailT was ever logged alone.
        reason = f"{failed[0]} failed: {view.errors.get(failed[0], '')}"
        return Plan([rec.abort_saga(sid, epoch, reason, now_ms)], [])
    for name, v in state.vertices.items():
        if v.req is Req.PENDING and all(
            state.vertices[d].req is Req.DONE for d in state.deps[name]
        ):
            records.append(rec.start_t(sid, epoch, name, 1, now_ms))
        elif v.req is Req.STARTED:
            calls.append(Call(name, False, v.req_attempt))
    if all(v.req is Req.DONE for v in state.vertices.values()):
        records.append(rec.end_saga(sid, epoch, log_pb2.OUTCOME_COMPLETED, now_ms))
    return Plan(records, calls)


def _plan_aborting(view: SagaView, epoch: int, now_ms: int) -> Plan:
    sid, state = view.saga_id, view.state
    records: list[log_pb2.Record] = []
    calls: list[Call] = []
    for name, v in state.vertices.items():
        if not started(v):
            continue
        if v.comp is Comp.NONE:
            dependents_done = all(
                not started(state.vertices[d]) or state.vertices[d].comp is Comp.DONE
                for d in state.dependents[name]
            )
            if dependents_done:
                records.append(rec.start_c(sid, epoch, name, 1, now_ms))
        elif v.comp in (Comp.STARTED, Comp.STUCK):
            calls.append(Call(name, True, v.comp_attempt))
    if all(not started(v) or v.comp is Comp.DONE for v in state.vertices.values()):
        records.append(rec.end_saga(sid, epoch, log_pb2.OUTCOME_ABORTED, now_ms))
    return Plan(records, calls)


def on_reply(view: SagaView, call: Call, reply: Reply, epoch: int, now_ms: int) -> Response:
    if call.vertex not in view.vertices or view.phase is Phase.ENDED:
        # After EndSaga nothing more is logged: a late answer (say, a refusal of a
        # request whose compensation left a tombstone) changes nothing.
        return Response([])
    if call.compensation:
        return _on_compensation_reply(view, call, reply, epoch, now_ms)
    return _on_request_reply(view, call, reply, epoch, now_ms)


def _on_request_reply(
    view: SagaView, call: Call, reply: Reply, epoch: int, now_ms: int
) -> Response:
    sid, name = view.saga_id, call.vertex
    v = view.state.vertices[name]
    if v.req is not Req.STARTED or v.req_attempt != call.attempt:
        return Response([])  # a stale reply: the log has moved on
    running = view.phase is Phase.RUNNING
    if reply.ok and len(reply.output) > codec.MAX_OUTPUT_BYTES:
        # The log would refuse the EndT; a participant that answers too much is
        # treated as one that refused, and the saga aborts with a clear reason.
        reply = Reply(
            False,
            error=f"the output is {len(reply.output)} bytes; the limit is {codec.MAX_OUTPUT_BYTES}",
        )
    if reply.ok:
        # Also after AbortSaga: the compensation can then use the output.
        return Response([rec.end_t(sid, epoch, name, reply.output, now_ms)])
    if reply.ok is False:
        error = _text(reply.error)
        records = [rec.fail_t(sid, epoch, name, error, log_pb2.BUSINESS, now_ms)]
        if running:
            records.append(rec.abort_saga(sid, epoch, _text(f"{name} refused: {error}"), now_ms))
        return Response(records)
    if not running:
        return Response([])  # aborting: the compensation is sent regardless
    vertex = view.vertices[name]
    if call.attempt < max_attempts(vertex):
        return Response([], retry_after_ms=backoff_ms(vertex, call.attempt))
    error = _text(f"no answer after {call.attempt} attempts: {reply.error}")
    return Response(
        [
            rec.fail_t(sid, epoch, name, error, log_pb2.TRANSPORT_EXHAUSTED, now_ms),
            rec.abort_saga(sid, epoch, _text(f"{name} unreachable: {reply.error}"), now_ms),
        ]
    )


def _on_compensation_reply(
    view: SagaView, call: Call, reply: Reply, epoch: int, now_ms: int
) -> Response:
    sid, name = view.saga_id, call.vertex
    v = view.state.vertices[name]
    if v.comp not in (Comp.STARTED, Comp.STUCK) or v.comp_attempt != call.attempt:
        return Response([])
    if reply.ok:
        return Response([rec.end_c(sid, epoch, name, time_ms=now_ms)])
    vertex = view.vertices[name]
    delay = backoff_ms(vertex, call.attempt, cap_ms=COMPENSATION_BACKOFF_CAP_MS)
    return Response([], retry_after_ms=delay)


def retry(view: SagaView, call: Call, epoch: int, now_ms: int) -> list[log_pb2.Record] | None:
    """The next attempt of a failed call. None: nothing to retry any more (the log
    moved on); []: re-send the same call now; records: log them, then call."""
    if call.vertex not in view.vertices:
        return None
    sid, name = view.saga_id, call.vertex
    v = view.state.vertices[name]
    if call.compensation:
        if v.comp not in (Comp.STARTED, Comp.STUCK) or v.comp_attempt != call.attempt:
            return None
        records = []
        if call.attempt >= STUCK_AFTER_ATTEMPTS and v.comp is Comp.STARTED:
            error = f"compensation failed {call.attempt} times; still retrying"
            records.append(rec.stuck(sid, epoch, name, error, now_ms))
        if call.attempt < MAX_LOGGED_COMPENSATION_ATTEMPTS:
            records.append(rec.start_c(sid, epoch, name, call.attempt + 1, now_ms))
        return records
    if view.phase is not Phase.RUNNING or v.req is not Req.STARTED:
        return None
    if v.req_attempt != call.attempt:
        return None
    return [rec.start_t(sid, epoch, name, call.attempt + 1, now_ms)]


def _text(text: str) -> str:
    """Participant-supplied text, cut to what a record may carry."""
    return text[: codec.MAX_TEXT_LEN]


def step_request(view: SagaView, call: Call, epoch: int) -> participant_pb2.StepRequest:
    """What is sent to the participant for `call`."""
    vertex = view.vertices[call.vertex]
    key = request_key(view.saga_id, call.vertex)
    return participant_pb2.StepRequest(
        saga_id=view.saga_id,
        vertex=call.vertex,
        action=vertex.compensation if call.compensation else vertex.request,
        payload=view.payload,
        idempotency_key=compensation_key(view.saga_id, call.vertex) if call.compensation else key,
        request_key=key,
        attempt=call.attempt,
        epoch=epoch,
        outputs=view.outputs,
    )
