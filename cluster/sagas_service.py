"""The `Sagas` gRPC service: the client API, answered by any node.

Writes (Submit, Abort, Resolve) and linearizable reads (Get, List) are served by
the leader once it is in office; a follower forwards them to the leader (one hop,
marked in metadata so that two nodes that disagree about who leads cannot bounce
a call forever). A linearizable read commits an empty batch first: the answer then
reflects every write acknowledged before the read began. Watch is served by
whichever node is asked, from its applied log, so a client can reconnect anywhere
after a failover and resume from the sequence number it saw last.
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Protocol

import grpc
from saga.v1 import log_pb2, sagas_pb2, sagas_pb2_grpc

from cluster.grpcutil import channel_to
from cluster.service import PROPOSE_ERROR_CODES
from coordinator.definition import check_definition
from coordinator.view import SagaView
from sagalog import codec
from sagalog import records as rec
from sagalog.log import SagaLog
from sagalog.proposer import ProposeError, Proposer
from sagalog.transitions import Comp, Phase, Req

FORWARDED = "x-saga-forwarded"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
LIST_SCAN_LIMIT = 10_000  # sagas examined per List call when filtering
# Each Watch holds a gRPC worker thread while it streams: keep them a small share
# of NodeConfig.grpc_workers so that Submit, Get and Status always find a thread.
MAX_WATCHERS = 16
WATCH_POLL_S = 0.02
WATCH_MAX_S = 3600.0  # a Watch stream ends after this long; the client resumes it
WATCH_UNKNOWN_GRACE_S = 5.0
WRITE_TIMEOUT_S = 5.0
# Back-pressure: Submit answers RESOURCE_EXHAUSTED, instead of letting every saga's
# latency grow without bound, while the sagas in flight reach the coordinator's
# limit (adapted to the latency sagas see: coordinator/admission.py), or while
# the coordinator is more than this far behind (the longest a participant's reply
# or an applied record waited for it, or the age of the oldest record waiting to
# be proposed: `Driver.lag_s`).
MAX_COORDINATOR_LAG_S = 0.5
_PROPOSE_CODES_KEPT = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT)


class NodeView(Protocol):
    """What the service needs from the node process."""

    raft: Any
    proposer: Proposer | None

    def office_epoch(self) -> int | None: ...
    def sagas_in_flight(self) -> int: ...
    def saga_limit(self) -> int: ...
    def coordinator_lag_s(self) -> float: ...
    def leader_grpc_addr(self) -> str | None: ...
    def is_leader(self) -> bool: ...


_SAGA_STATES = {
    (Phase.RUNNING, False): sagas_pb2.RUNNING,
    (Phase.ABORTING, False): sagas_pb2.ABORTING,
    (Phase.ABORTING, True): sagas_pb2.STUCK,
}


def ended_state(outcome: int) -> int:
    return sagas_pb2.COMPLETED if outcome == log_pb2.OUTCOME_COMPLETED else sagas_pb2.ABORTED


def saga_state(view: SagaView) -> int:
    if view.phase is Phase.ENDED:
        return ended_state(view.outcome)
    return _SAGA_STATES.get((view.phase, view.state.stuck), sagas_pb2.SAGA_STATE_UNSPECIFIED)


def vertex_state(view: SagaView, name: str) -> int:
    v = view.state.vertices[name]
    if v.comp is Comp.DONE:
        return sagas_pb2.COMPENSATED
    if v.comp is Comp.STUCK:
        return sagas_pb2.VERTEX_STUCK
    if v.comp is Comp.STARTED:
        return sagas_pb2.COMPENSATING
    return {
        Req.PENDING: sagas_pb2.PENDING,
        Req.STARTED: sagas_pb2.STARTED,
        Req.DONE: sagas_pb2.DONE,
        Req.FAILED: sagas_pb2.FAILED,
    }[v.req]


def saga_info(view: SagaView) -> sagas_pb2.SagaInfo:
    info = sagas_pb2.SagaInfo(
        saga_id=view.saga_id,
        state=saga_state(view),  # type: ignore[arg-type]
        name=view.definition.name if view.definition else "",
        records=view.records,
        abort_reason=view.abort_reason,
        started_unix_ms=view.started_ms,
        ended_unix_ms=view.ended_ms,
    )
    for name, v in view.state.vertices.items():
        info.vertices.add(
            name=name,
            state=vertex_state(view, name),  # type: ignore[arg-type]
            attempts=v.req_attempt,
            compensation_attempts=v.comp_attempt,
            output=view.outputs.get(name, b""),
            error=view.errors.get(name, ""),
        )
    return info


def purged_info(saga_id: str, stone: log_pb2.Tombstone) -> sagas_pb2.SagaInfo:
    """A saga whose records the retention policy removed: what its tombstone kept."""
    return sagas_pb2.SagaInfo(
        saga_id=saga_id,
        state=ended_state(stone.outcome),  # type: ignore[arg-type]
        name=stone.name,
        abort_reason=stone.abort_reason,
        started_unix_ms=stone.started_unix_ms,
        ended_unix_ms=stone.ended_unix_ms,
        purged=True,
    )


def _records_or_tombstone(
    saga_log: SagaLog, saga_id: str
) -> tuple[list[log_pb2.Record], log_pb2.Tombstone | None]:
    """The saga's records; or, when retention purged them, its tombstone."""
    records = saga_log.records(saga_id)
    return records, None if records else saga_log.tombstone(saga_id)


class SagasService(sagas_pb2_grpc.SagasServicer):
    def __init__(self, node: NodeView) -> None:
        self._node = node
        self._watchers = threading.BoundedSemaphore(MAX_WATCHERS)
        # One channel per leader address, never closed while calls may use it.
        self._channels: dict[str, grpc.Channel] = {}
        self._channels_lock = threading.Lock()

    # ---- routing ---------------------------------------------------------------------

    def _forward(self, method: str, request: Any, context: Any) -> Any | None:
        """On a follower, the leader's answer; None when this node should answer."""
        if self._node.is_leader():
            return None
        forwarded = dict(context.invocation_metadata()).get(FORWARDED)
        leader = self._node.leader_grpc_addr()
        if forwarded or not leader:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"not the leader; leader: {leader or 'unknown (election in progress)'}",
            )
        assert leader is not None
        with self._channels_lock:
            channel = self._channels.get(leader)
            if channel is None:
                channel = self._channels[leader] = channel_to(leader)
        stub = sagas_pb2_grpc.SagasStub(channel)
        remaining = context.time_remaining()
        try:
            return getattr(stub, method)(
                request,
                timeout=remaining if remaining is not None else WRITE_TIMEOUT_S * 2,
                metadata=[(FORWARDED, "1")],
            )
        except grpc.RpcError as exc:
            context.abort(exc.code(), exc.details())
            raise

    def _epoch(self, context: Any) -> int:
        epoch = self._node.office_epoch()
        if epoch is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the leader is taking office; retry")
        assert epoch is not None
        return epoch

    def _propose(self, records: list[log_pb2.Record], context: Any) -> log_pb2.BatchResult:
        proposer = self._node.proposer
        if proposer is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the node is starting")
        assert proposer is not None
        try:
            return proposer.propose(codec.encode_batch(records), WRITE_TIMEOUT_S)
        except ProposeError as exc:
            # The Cluster service's codes where they say "retry later" or "never
            # retry this"; anything else is UNAVAILABLE here (the client retries it).
            code = PROPOSE_ERROR_CODES.get(exc.code, grpc.StatusCode.UNAVAILABLE)
            if code not in _PROPOSE_CODES_KEPT:
                code = grpc.StatusCode.UNAVAILABLE
            context.abort(code, str(exc))
            raise

    def _barrier(self, context: Any) -> None:
        """Commit an empty entry: proves leadership now and that every write
        acknowledged before this read is applied here."""
        self._epoch(context)
        result = self._propose([], context)
        if result.error:
            context.abort(grpc.StatusCode.INTERNAL, result.error)

    def _read(
        self, saga_id: str, context: Any
    ) -> tuple[list[log_pb2.Record], log_pb2.Tombstone | None]:
        """Records or tombstone of a saga that exists; INVALID_ARGUMENT or NOT_FOUND."""
        error = codec.check_saga_id(saga_id)
        if error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        with self._node.raft.reading() as saga_log:
            records, stone = _records_or_tombstone(saga_log, saga_id)
        if not records and stone is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no saga with id {saga_id!r}")
        return records, stone

    def _view(self, saga_id: str, context: Any) -> SagaView:
        """The saga to change: FAILED_PRECONDITION when retention purged it."""
        records, stone = self._read(saga_id, context)
        if stone is not None:
            state = sagas_pb2.SagaState.Name(ended_state(stone.outcome))
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"saga {saga_id!r} has ended ({state}) and its records were purged "
                "by the retention policy",
            )
        return SagaView.from_records(saga_id, records)

    # ---- writes ----------------------------------------------------------------------

    def Submit(self, request: Any, context: Any) -> sagas_pb2.SubmitReply:
        saga_id = request.saga_id or uuid.uuid4().hex
        for error in (
            codec.check_saga_id(saga_id),
            check_definition(request.definition),
            _payload_error(request.payload),
        ):
            if error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        if request.saga_id != saga_id:
            request = sagas_pb2.SubmitRequest(
                definition=request.definition, payload=request.payload, saga_id=saga_id
            )
        forwarded = self._forward("Submit", request, context)
        if forwarded is not None:
            return forwarded
        epoch = self._epoch(context)
        in_flight, limit = self._node.sagas_in_flight(), self._node.saga_limit()
        if in_flight >= limit:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{in_flight} sagas are in flight; the limit is {limit} now "
                "(it follows the latency sagas see); retry later",
            )
        lag = self._node.coordinator_lag_s()
        if lag > MAX_COORDINATOR_LAG_S:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the coordinator is {lag * 1000:.0f} ms behind "
                f"(limit {MAX_COORDINATOR_LAG_S * 1000:.0f} ms); retry later",
            )
        record = rec.start_saga(
            saga_id, epoch, request.definition, request.payload, int(time.time() * 1000)
        )
        result = self._propose([record], context).results[0]
        if result.verdict == log_pb2.ACCEPTED:
            return sagas_pb2.SubmitReply(saga_id=saga_id, created=True)
        if result.verdict == log_pb2.DUPLICATE:
            return sagas_pb2.SubmitReply(saga_id=saga_id, created=False)
        if "conflict" in result.reason:
            context.abort(
                grpc.StatusCode.ALREADY_EXISTS,
                f"saga {saga_id!r} already exists with a different definition or payload",
            )
        if "stale epoch" in result.reason:
            context.abort(
                grpc.StatusCode.UNAVAILABLE, f"leadership changed; retry ({result.reason})"
            )
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, result.reason)
        raise AssertionError("unreachable")

    def Abort(self, request: Any, context: Any) -> sagas_pb2.AbortReply:
        forwarded = self._forward("Abort", request, context)
        if forwarded is not None:
            return forwarded
        epoch = self._epoch(context)
        view = self._view(request.saga_id, context)
        if view.phase is Phase.ENDED:
            ended = sagas_pb2.SagaState.Name(saga_state(view))  # type: ignore[arg-type]
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"saga {request.saga_id!r} has already ended ({ended})",
            )
        if view.phase is Phase.ABORTING:
            return sagas_pb2.AbortReply()
        reason = codec_text(request.reason or "aborted by a user")
        record = rec.abort_saga(request.saga_id, epoch, reason, int(time.time() * 1000))
        result = self._propose([record], context).results[0]
        if result.verdict == log_pb2.REJECTED and "conflict" not in result.reason:
            code = (
                grpc.StatusCode.UNAVAILABLE
                if "stale epoch" in result.reason
                else grpc.StatusCode.FAILED_PRECONDITION
            )
            context.abort(code, result.reason)
        return sagas_pb2.AbortReply()

    def Resolve(self, request: Any, context: Any) -> sagas_pb2.ResolveReply:
        if not request.reason:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give the reason for the resolution")
        forwarded = self._forward("Resolve", request, context)
        if forwarded is not None:
            return forwarded
        epoch = self._epoch(context)
        view = self._view(request.saga_id, context)
        if request.vertex not in view.state.vertices:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no vertex {request.vertex!r} in the saga")
        comp = view.comp(request.vertex)
        if comp not in (Comp.STARTED, Comp.STUCK):
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"vertex {request.vertex!r} has no compensation in progress ({comp.value})",
            )
        record = rec.end_c(
            request.saga_id,
            epoch,
            request.vertex,
            resolved_by=codec_text(f"resolved by an operator: {request.reason}"),
            time_ms=int(time.time() * 1000),
        )
        result = self._propose([record], context).results[0]
        if result.verdict == log_pb2.REJECTED:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, result.reason)
        return sagas_pb2.ResolveReply()

    # ---- reads -----------------------------------------------------------------------

    def Get(self, request: Any, context: Any) -> sagas_pb2.SagaInfo:
        forwarded = self._forward("Get", request, context)
        if forwarded is not None:
            return forwarded
        self._barrier(context)
        records, stone = self._read(request.saga_id, context)
        if stone is not None:
            return purged_info(request.saga_id, stone)
        return saga_info(SagaView.from_records(request.saga_id, records))

    def List(self, request: Any, context: Any) -> sagas_pb2.ListReply:
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if page_size > MAX_PAGE_SIZE:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"page_size exceeds {MAX_PAGE_SIZE}")
        forwarded = self._forward("List", request, context)
        if forwarded is not None:
            return forwarded
        self._barrier(context)
        reply = sagas_pb2.ListReply()
        examined = 0
        last = ""
        ids = self._page_of_ids(request.page_token, LIST_SCAN_LIMIT)
        for saga_id in ids:
            last = saga_id
            examined += 1
            # One saga at a time under the store lock: a long List must not hold up
            # a snapshot install or the coordinator's reads.
            with self._node.raft.reading() as saga_log:
                records, stone = _records_or_tombstone(saga_log, saga_id)
            if stone is not None:
                info = purged_info(saga_id, stone)
                state, name = info.state, info.name
            else:
                view = SagaView.from_records(saga_id, records)
                state = saga_state(view)
                name = view.definition.name if view.definition else ""
            if not request.state or request.state == state:
                reply.sagas.add(saga_id=saga_id, state=state, name=name)  # type: ignore[arg-type]
            if len(reply.sagas) >= page_size:
                break
        if len(reply.sagas) >= page_size or examined >= LIST_SCAN_LIMIT:
            reply.next_page_token = last
        return reply

    def _page_of_ids(self, after: str, limit: int) -> list[str]:
        with self._node.raft.reading() as saga_log:
            return list(itertools.islice(saga_log.saga_ids(after=after), limit))

    def Watch(self, request: Any, context: Any) -> Iterator[sagas_pb2.WatchEvent]:
        error = codec.check_saga_id(request.saga_id)
        if error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        if not self._watchers.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{MAX_WATCHERS} watchers already")
        try:
            yield from self._watch(request.saga_id, request.from_seq, context)
        finally:
            self._watchers.release()

    def _watch(self, saga_id: str, seq: int, context: Any) -> Iterator[sagas_pb2.WatchEvent]:
        started = time.monotonic()
        known = False
        while context.is_active() and time.monotonic() - started < WATCH_MAX_S:
            with self._node.raft.reading() as saga_log:
                records = saga_log.records_from(saga_id, seq)
                known = known or saga_log.saga_number(saga_id) is not None
                ended = not records and saga_log.has_ended(saga_id)
                purged = ended and saga_log.tombstone(saga_id) is not None
            if purged:
                context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"saga {saga_id!r} has ended and its records were purged by the "
                    "retention policy; Get still answers",
                )
            if ended:
                return  # asked from past the saga's last record
            # A saga submitted through the leader may reach this node a little later.
            if not known and time.monotonic() - started > WATCH_UNKNOWN_GRACE_S:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no saga with id {saga_id!r}")
            for record in records:
                yield sagas_pb2.WatchEvent(seq=seq, record=record)
                seq += 1
                if record.HasField("end_saga"):
                    return
            time.sleep(WATCH_POLL_S)


def _payload_error(payload: bytes) -> str:
    if len(payload) > codec.MAX_PAYLOAD_BYTES:
        return f"the payload is {len(payload)} bytes; the limit is {codec.MAX_PAYLOAD_BYTES}"
    return ""


def codec_text(text: str) -> str:
    return text[: codec.MAX_TEXT_LEN]
