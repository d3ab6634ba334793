"""The `Sagas` gRPC service: the client API, answered by any node.

Writes (Submit, Abort, Resolve) are decided by the leader once it is in office; a
follower forwards them to the leader (one hop, marked in metadata so that two
nodes that disagree about who leads cannot bounce a call forever).

Linearizable reads (Get, List) add no log entry: the node asked gets a read index
(ReadIndex: the leader's commit index once a heartbeat round has confirmed its
leadership; `sagalog.readindex`), waits until it has applied that index, and
answers from its own store. The answer reflects every write acknowledged before
the read began.

Watch and Run are pushed, never polled (`cluster.runtime.push`): each record this node
applies wakes the streams of its saga. They run as coroutines on the gRPC event
loop, so a node holds thousands of them without a thread each; the other
methods run on the server's thread pool. Watch is served by whichever node is
asked, so a client can reconnect anywhere after a failover and resume from the
sequence number it saw last. Run submits (forwarded like Submit) and then waits
for this node's own apply of EndSaga: a follower never holds a call open on the
leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import grpc
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2, sagas_pb2, sagas_pb2_grpc

from cluster import auth
from cluster.grpcutil import channel_to
from cluster.logformat import saga_fields
from cluster.runtime import statuses
from cluster.runtime.groups import GROUP_HOP, GroupRouter, merge_pages
from cluster.runtime.push import AppliedFeed, Subscription
from cluster.runtime.service import READ_INDEX_TIMEOUT_S
from cluster.shardmap import Group
from cluster.tls import TlsFiles
from coordinator import core
from coordinator.view import SagaView
from sagalog import codec
from sagalog import records as rec
from sagalog.definition import check_definition, endpoint_allowed
from sagalog.log import SagaLog
from sagalog.proposer import ProposeError, Proposer
from sagalog.readindex import ReadRefused
from sagalog.transitions import Comp, Phase, Req

log = logging.getLogger("sagacluster.sagas")

FORWARDED = "x-saga-forwarded"
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
LIST_SCAN_LIMIT = 10_000  # sagas examined per List call when filtering
# Watch and Run calls waiting on one node at once; past it: RESOURCE_EXHAUSTED.
# Each is a coroutine and a subscription of at most push.MAX_BUFFERED_RECORDS
# records (a few KiB idle), so the bound is on memory, not threads.
MAX_PUSH_STREAMS = 20_000
WATCH_MAX_S = 3600.0  # a Watch stream ends after this long; the client resumes it
WATCH_UNKNOWN_GRACE_S = 5.0  # a saga submitted through the leader may reach this node late
# A stream re-reads the store after this long without a pushed record: a safety
# net only (every applied record and every snapshot install is pushed).
PUSH_RECHECK_S = 30.0
WRITE_TIMEOUT_S = 5.0
READ_APPLY_TIMEOUT_S = 5.0  # a node this far behind the read index answers UNAVAILABLE
# Back-pressure: Submit answers RESOURCE_EXHAUSTED, instead of letting every saga's
# latency grow without bound, while the sagas in flight reach the coordinator's
# limit (adapted to the latency sagas see: coordinator/admission.py), or while
# the coordinator is more than this far behind (the longest a participant's reply
# or an applied record waited for it, or the age of the oldest record waiting to
# be proposed: `Driver.lag_s`).
MAX_COORDINATOR_LAG_S = 0.5


class NodeView(Protocol):
    """What the service needs from the node process."""

    raft: Any
    proposer: Proposer | None
    feed: AppliedFeed | None  # pushes applied records to Watch and Run

    def office_epoch(self) -> int | None: ...
    def office_term(self) -> int | None: ...
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


class Refusal(Exception):
    """An answer other than OK, raised anywhere below a handler: the handler's
    adapter turns it into the gRPC status (sync and async handlers alike)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Call:
    """What the service reads from a call's context, whichever server runs it."""

    forwarded: bool  # a follower sent it here: never forward it again
    deadline: float | None  # time.monotonic() by which the caller wants an answer
    authorization: str | None = None  # the caller's credential, passed on when forwarding
    group_hop: bool = False  # a node of another group sent it here: answer for this group

    @staticmethod
    def of(context: Any) -> Call:
        metadata = dict(context.invocation_metadata() or ())
        remaining = context.time_remaining()
        return Call(
            forwarded=bool(metadata.get(FORWARDED)),
            deadline=None if remaining is None else time.monotonic() + remaining,
            authorization=metadata.get(auth.HEADER),
            group_hop=bool(metadata.get(GROUP_HOP)),
        )

    @property
    def time_remaining_s(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def credential(self) -> list[tuple[str, str]]:
        return [(auth.HEADER, self.authorization)] if self.authorization else []

    def timeout_s(self) -> float:
        """What is left of the caller's deadline (a bounded default without one)."""
        remaining = self.time_remaining_s
        return remaining if remaining is not None else WRITE_TIMEOUT_S * 2

    def forwarding(self) -> list[tuple[str, str]]:
        """Metadata of this call sent on to the leader: marked, with the caller's
        own credential (the leader checks the caller's role, not this node's) and,
        for a call another group sent here, that mark too."""
        hop = [(GROUP_HOP, "1")] if self.group_hop else []
        return [(FORWARDED, "1"), *self.credential(), *hop]


def _answers(handler: Callable[..., Any]) -> Callable[..., Any]:
    """A synchronous handler whose Refusals become the call's status."""

    @functools.wraps(handler)
    def wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return handler(self, request, Call.of(context))
        except Refusal as refusal:
            context.abort(refusal.code, refusal.message)
            raise

    return wrapper


def _records_or_tombstone(
    saga_log: SagaLog, saga_id: str
) -> tuple[list[log_pb2.Record], log_pb2.Tombstone | None]:
    """The saga's records; or, when retention purged them, its tombstone."""
    records = saga_log.records(saga_id)
    return records, None if records else saga_log.tombstone(saga_id)


class _LeaderStubs(NamedTuple):
    sagas: sagas_pb2_grpc.SagasStub
    cluster: cluster_pb2_grpc.ClusterStub


class SagasService(sagas_pb2_grpc.SagasServicer):
    def __init__(
        self,
        node: NodeView,
        participant_allow: tuple[str, ...] = (),
        tls: TlsFiles | None = None,  # how this node dials the leader
        on_refused: Callable[[str], None] = lambda reason: None,  # admission: why
        router: GroupRouter | None = None,  # None: the cluster has one Raft group
    ) -> None:
        self._node = node
        self._router = router
        self._on_refused = on_refused
        self._participant_allow = participant_allow
        self._tls = tls
        # Stubs on one channel per leader address, never closed while calls may use
        # it (a stub builds a callable per method: once per leader, not per call).
        self._leaders: dict[str, _LeaderStubs] = {}
        self._channels_lock = threading.Lock()
        # Submits admitted and not answered yet: their sagas are not in the
        # coordinator's count until StartSaga applies, and a burst let through
        # between two applies would overshoot the limit.
        self._admitting = 0
        self._admitting_lock = threading.Lock()

    # ---- routing ---------------------------------------------------------------------

    def _foreign(self, saga_id: str, call: Call) -> Group | None:
        """The group that holds this saga when it is not this node's (the call goes
        there); None when it is."""
        if self._router is None:
            return None
        group = self._router.foreign(saga_id)
        if group is not None and call.group_hop:
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"saga {saga_id!r} belongs to group {group.index}, not to this node's group "
                f"{self._router.own.index}: the nodes were given different shard maps",
            )
        return group

    def _in_group(self, group: Group, method: str, request: Any, call: Call) -> Any:
        """The answer of the group that holds the saga (blocking)."""
        assert self._router is not None
        try:
            return self._router.forward(group, method, request, call.credential(), call.timeout_s())
        except grpc.RpcError as exc:
            raise Refusal(exc.code(), exc.details()) from None

    async def _in_group_async(
        self, group: Group, method: str, request: Any, call: Call, timeout_s: float | None
    ) -> Any:
        assert self._router is not None
        try:
            return await self._router.aforward(group, method, request, call.credential(), timeout_s)
        except grpc.RpcError as exc:
            raise Refusal(exc.code(), exc.details()) from None

    def _leader(self, call: Call) -> _LeaderStubs:
        leader = self._node.leader_grpc_addr()
        if call.forwarded or not leader:
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f"not the leader; leader: {leader or 'unknown (election in progress)'}",
            )
        with self._channels_lock:
            stubs = self._leaders.get(leader)
            if stubs is None:
                channel = channel_to(leader, self._tls)
                stubs = _LeaderStubs(
                    sagas_pb2_grpc.SagasStub(channel), cluster_pb2_grpc.ClusterStub(channel)
                )
                self._leaders[leader] = stubs
        return stubs

    def _forward(self, method: str, request: Any, call: Call) -> Any | None:
        """On a follower, the leader's answer; None when this node should answer."""
        if self._node.is_leader():
            return None
        stub = self._leader(call).sagas
        try:
            return getattr(stub, method)(
                request, timeout=call.timeout_s(), metadata=call.forwarding()
            )
        except grpc.RpcError as exc:
            raise Refusal(exc.code(), exc.details()) from None

    def _epoch(self) -> int:
        epoch = self._node.office_epoch()
        if epoch is None:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "the leader is taking office; retry")
        return epoch

    def _propose(self, records: list[log_pb2.Record]) -> log_pb2.BatchResult:
        proposer = self._node.proposer
        if proposer is None:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "the node is starting")
        try:
            return proposer.propose(codec.encode_batch(records), WRITE_TIMEOUT_S)
        except ProposeError as exc:
            raise Refusal(statuses.propose_failed(exc.code, for_clients=True), str(exc)) from None

    def _linearize(self, call: Call) -> None:
        """Return once this node's store reflects every write acknowledged before
        the call began (ReadIndex: no log entry)."""
        raft = self._node.raft
        if raft is None:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "the node is starting")
        try:
            if self._node.is_leader():
                term = self._node.office_term()
                if term is None:
                    raise Refusal(grpc.StatusCode.UNAVAILABLE, "the leader is taking office")
                index = raft.read_index(READ_INDEX_TIMEOUT_S, term)
            else:
                stub = self._leader(call).cluster
                reply = stub.ReadIndex(
                    cluster_pb2.ReadIndexRequest(),
                    timeout=READ_INDEX_TIMEOUT_S,
                    metadata=call.forwarding(),
                )
                index = reply.index
        except (ReadRefused, TimeoutError) as exc:
            reason = f"cannot confirm leadership: {exc}"
            raise Refusal(grpc.StatusCode.UNAVAILABLE, reason) from None
        except grpc.RpcError as exc:
            code = exc.code()
            if code not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                code = grpc.StatusCode.UNAVAILABLE  # the client tries again, or elsewhere
            raise Refusal(code, f"read index: {exc.details()}") from None
        if not raft.wait_applied(index, READ_APPLY_TIMEOUT_S):
            raise Refusal(
                grpc.StatusCode.UNAVAILABLE,
                f"this node has not applied the read index {index} within "
                f"{READ_APPLY_TIMEOUT_S:.0f}s; retry on another node",
            )

    def _read(self, saga_id: str) -> tuple[list[log_pb2.Record], log_pb2.Tombstone | None]:
        """Records or tombstone of a saga that exists; INVALID_ARGUMENT or NOT_FOUND."""
        _check_saga_id(saga_id)
        with self._node.raft.reading() as saga_log:
            records, stone = _records_or_tombstone(saga_log, saga_id)
        if not records and stone is None:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"no saga with id {saga_id!r}")
        return records, stone

    def _view(self, saga_id: str) -> SagaView:
        """The saga to change: FAILED_PRECONDITION when retention purged it."""
        records, stone = self._read(saga_id)
        if stone is not None:
            state = sagas_pb2.SagaState.Name(ended_state(stone.outcome))
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"saga {saga_id!r} has ended ({state}) and its records were purged "
                "by the retention policy",
            )
        return SagaView.from_records(saga_id, records)

    # ---- writes ----------------------------------------------------------------------

    def _checked(self, request: Any) -> sagas_pb2.SubmitRequest:
        """The request with its saga id (generated when empty), once valid."""
        request = _with_id(request)
        for error in (
            codec.check_saga_id(request.saga_id),
            check_definition(request.definition),
            _payload_error(request.payload),
        ):
            if error:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, error)
        for v in request.definition.vertices:
            if not endpoint_allowed(v.endpoint, self._participant_allow):
                raise Refusal(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"vertex {v.name!r}: endpoint {v.endpoint!r} is not among the participants "
                    "this cluster may call (--participant-allow)",
                )
        return request

    def admit(self) -> None:
        """Refuse a new saga while the leader is full, before any other work: past
        the peak, a refusal must cost less than the saga it keeps out, or refusing
        eats the capacity that admitted sagas need. A follower admits everything
        here: it forwards, and the leader decides."""
        if self._node.is_leader():
            self._refuse_when_full(self._admitting)

    @contextlib.contextmanager
    def _admission(self) -> Iterator[None]:
        """`admit`, counting this Submit among the sagas in flight until it answers."""
        if not self._node.is_leader():
            yield
            return
        with self._admitting_lock:
            self._refuse_when_full(self._admitting)
            self._admitting += 1
        try:
            yield
        finally:
            with self._admitting_lock:
                self._admitting -= 1

    def _refuse_when_full(self, admitting: int) -> None:
        in_flight = self._node.sagas_in_flight() + admitting
        limit = self._node.saga_limit()
        if in_flight >= limit:
            self._on_refused("limit")
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{in_flight} sagas are in flight; the limit is {limit} now "
                "(it follows the latency sagas see); retry later",
            )
        lag = self._node.coordinator_lag_s()
        if lag > MAX_COORDINATOR_LAG_S:
            self._on_refused("coordinator_lag")
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the coordinator is {lag * 1000:.0f} ms behind "
                f"(limit {MAX_COORDINATOR_LAG_S * 1000:.0f} ms); retry later",
            )

    def submit(self, request: sagas_pb2.SubmitRequest, call: Call) -> sagas_pb2.SubmitReply:
        """Submit's whole answer (Run's first half); blocking; raises Refusal."""
        with self._admission():
            return self._submit(request, call)

    def _submit(self, request: sagas_pb2.SubmitRequest, call: Call) -> sagas_pb2.SubmitReply:
        request = self._checked(request)
        saga_id = request.saga_id
        forwarded = self._forward("Submit", request, call)
        if forwarded is not None:
            return forwarded
        epoch = self._epoch()
        now_ms = int(time.time() * 1000)
        record = rec.start_saga(saga_id, epoch, request.definition, request.payload, now_ms)
        # The roots' StartT go in the same entry: one commit less on every saga's
        # critical path. Their fate follows the StartSaga's (the log refuses a StartT
        # of a saga it does not have, and answers DUPLICATE for a resubmission).
        opening = core.plan_ahead(SagaView(saga_id), [record], epoch, now_ms).records
        result = self._propose([record, *opening]).results[0]
        if result.verdict == log_pb2.ACCEPTED:
            return sagas_pb2.SubmitReply(saga_id=saga_id, created=True)
        if result.verdict == log_pb2.DUPLICATE:
            return sagas_pb2.SubmitReply(saga_id=saga_id, created=False)
        if result.code == log_pb2.REJECT_CONFLICT:
            raise Refusal(
                statuses.rejected(result),
                f"saga {saga_id!r} already exists with a different definition or payload",
            )
        if result.code == log_pb2.REJECT_STALE_EPOCH:
            raise Refusal(statuses.rejected(result), f"leadership changed; retry ({result.reason})")
        raise Refusal(statuses.rejected(result), result.reason)

    async def Submit(self, request: Any, context: Any) -> sagas_pb2.SubmitReply:
        try:
            request = _with_id(request)
            call = Call.of(context)
            group = self._foreign(request.saga_id, call)
            if group is not None:
                return await self._in_group_async(group, "Submit", request, call, call.timeout_s())
            self.admit()  # on the event loop: a refusal costs no thread hop
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, self.submit, request, call)
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)
            raise

    @_answers
    def Abort(self, request: Any, call: Call) -> sagas_pb2.AbortReply:
        _check_saga_id(request.saga_id)
        group = self._foreign(request.saga_id, call)
        if group is not None:
            return self._in_group(group, "Abort", request, call)
        forwarded = self._forward("Abort", request, call)
        if forwarded is not None:
            return forwarded
        epoch = self._epoch()
        view = self._view(request.saga_id)
        if view.phase is Phase.ENDED:
            ended = sagas_pb2.SagaState.Name(saga_state(view))  # type: ignore[arg-type]
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"saga {request.saga_id!r} has already ended ({ended})",
            )
        if view.phase is Phase.ABORTING:
            return sagas_pb2.AbortReply()
        reason = codec_text(request.reason or "aborted by a user")
        record = rec.abort_saga(request.saga_id, epoch, reason, int(time.time() * 1000))
        result = self._propose([record]).results[0]
        # A conflict is another AbortSaga already logged: aborted, as asked.
        if result.verdict == log_pb2.REJECTED and result.code != log_pb2.REJECT_CONFLICT:
            raise Refusal(statuses.rejected(result), result.reason)
        log.info(
            "saga %s aborted on request: %s",
            request.saga_id,
            reason,
            extra=saga_fields(request.saga_id, epoch=epoch),
        )
        return sagas_pb2.AbortReply()

    @_answers
    def Resolve(self, request: Any, call: Call) -> sagas_pb2.ResolveReply:
        if not request.reason:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, "give the reason for the resolution")
        _check_saga_id(request.saga_id)
        group = self._foreign(request.saga_id, call)
        if group is not None:
            return self._in_group(group, "Resolve", request, call)
        forwarded = self._forward("Resolve", request, call)
        if forwarded is not None:
            return forwarded
        epoch = self._epoch()
        view = self._view(request.saga_id)
        if request.vertex not in view.state.vertices:
            raise Refusal(grpc.StatusCode.NOT_FOUND, f"no vertex {request.vertex!r} in the saga")
        resolved_by = codec_text(f"resolved by an operator: {request.reason}")
        if _resolved_as(view, request.vertex, resolved_by):
            return sagas_pb2.ResolveReply()  # a retry of a resolution already logged
        comp = view.comp(request.vertex)
        if comp is not Comp.STUCK:
            # A compensation merely started may still be running: closing it by hand
            # could leave its booking in effect under an ABORTED saga.
            raise Refusal(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"vertex {request.vertex!r}: only a STUCK compensation can be resolved "
                f"(this one is {comp.value})",
            )
        record = rec.end_c(
            request.saga_id,
            epoch,
            request.vertex,
            resolved_by=resolved_by,
            time_ms=int(time.time() * 1000),
        )
        result = self._propose([record]).results[0]
        if result.verdict == log_pb2.REJECTED:
            # A conflict: another EndC closed this compensation first.
            code = (
                grpc.StatusCode.FAILED_PRECONDITION
                if result.code == log_pb2.REJECT_CONFLICT
                else statuses.rejected(result)
            )
            raise Refusal(code, result.reason)
        log.info(
            "saga %s: %s's compensation resolved by an operator: %s",
            request.saga_id,
            request.vertex,
            request.reason,
            extra=saga_fields(request.saga_id, request.vertex, epoch),
        )
        return sagas_pb2.ResolveReply()

    # ---- reads -----------------------------------------------------------------------

    def _info(self, saga_id: str) -> sagas_pb2.SagaInfo:
        records, stone = self._read(saga_id)
        if stone is not None:
            return purged_info(saga_id, stone)
        return saga_info(SagaView.from_records(saga_id, records))

    @_answers
    def Get(self, request: Any, call: Call) -> sagas_pb2.SagaInfo:
        _check_saga_id(request.saga_id)
        group = self._foreign(request.saga_id, call)
        if group is not None:
            return self._in_group(group, "Get", request, call)
        self._linearize(call)
        return self._info(request.saga_id)

    @_answers
    def List(self, request: Any, call: Call) -> sagas_pb2.ListReply:
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if page_size > MAX_PAGE_SIZE:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"page_size exceeds {MAX_PAGE_SIZE}")
        if self._router is None or call.group_hop:
            return self._list_group(request, page_size, call)
        # Every group's page after the same token, merged. Each is linearizable, so
        # the merge reflects every write acknowledged before the call began.
        pages = [self._list_group(request, page_size, call)]
        for group in self._router.others():
            pages.append(self._in_group(group, "List", request, call))
        sagas, token = merge_pages([(p.sagas, p.next_page_token) for p in pages], page_size)
        return sagas_pb2.ListReply(sagas=sagas, next_page_token=token)

    def _list_group(self, request: Any, page_size: int, call: Call) -> sagas_pb2.ListReply:
        """A page of this group's sagas."""
        self._linearize(call)
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

    # ---- pushed: Watch and Run (coroutines on the server's event loop) ---------------

    def _subscribe(self, saga_id: str) -> Subscription:
        feed = self._node.feed
        if feed is None or self._node.raft is None:
            raise Refusal(grpc.StatusCode.UNAVAILABLE, "the node is starting")
        if feed.subscriptions >= MAX_PUSH_STREAMS:
            raise Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{MAX_PUSH_STREAMS} Watch and Run calls already wait on this node; "
                "retry later or on another node",
            )
        return feed.subscribe(saga_id)

    def _unsubscribe(self, sub: Subscription) -> None:
        if self._node.feed is not None:
            self._node.feed.unsubscribe(sub)

    async def Run(self, request: Any, context: Any) -> sagas_pb2.SagaInfo:
        sub = None
        try:
            request = _with_id(request)
            call = Call.of(context)
            group = self._foreign(request.saga_id, call)
            if group is not None:
                # As long as the caller waits: no deadline of its own, none here.
                return await self._in_group_async(
                    group, "Run", request, call, call.time_remaining_s
                )
            self.admit()  # on the event loop: a refusal costs no thread hop
            request = self._checked(request)
            # Subscribe before submitting: an EndSaga applied from now on is pushed.
            sub = self._subscribe(request.saga_id)
            loop = asyncio.get_running_loop()
            ended = await loop.run_in_executor(None, self._submit_for_run, request, call)
            if ended is not None:
                return ended
            return await self._until_ended(request.saga_id, sub)
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)
            raise
        finally:
            if sub is not None:
                self._unsubscribe(sub)

    def _submit_for_run(self, request: Any, call: Call) -> sagas_pb2.SagaInfo | None:
        """Run's first half in one thread hop: submit, then the saga's info if it has
        ended already (a resubmitted saga)."""
        self.submit(request, call)
        return self._info_if_ended(request.saga_id)

    def _info_if_ended(self, saga_id: str) -> sagas_pb2.SagaInfo | None:
        with self._node.raft.reading() as saga_log:
            if not saga_log.has_ended(saga_id):
                return None
        return self._info(saga_id)

    async def _until_ended(self, saga_id: str, sub: Subscription) -> sagas_pb2.SagaInfo:
        """What Get answers, once this node has applied the saga's EndSaga."""
        look = False  # the caller looked just after subscribing
        while True:
            if look:
                # Off the event loop: a snapshot install holds the store lock for long.
                loop = asyncio.get_running_loop()
                info = await loop.run_in_executor(None, self._info_if_ended, saga_id)
                if info is not None:
                    return info
            await sub.wait(PUSH_RECHECK_S)
            records, fell_behind = sub.take()
            look = fell_behind or not records or any(r.HasField("end_saga") for _, r in records)

    async def Watch(self, request: Any, context: Any) -> AsyncIterator[sagas_pb2.WatchEvent]:
        sub = None
        try:
            _check_saga_id(request.saga_id)
            call = Call.of(context)
            group = self._foreign(request.saga_id, call)
            if group is not None:
                async for event in self._watch_in_group(group, request, call):
                    yield event
                return
            sub = self._subscribe(request.saga_id)
            stream = self._watch(request.saga_id, request.from_seq, sub, call)
            async for event in stream:
                yield event
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)
        finally:
            if sub is not None:
                self._unsubscribe(sub)

    async def _watch_in_group(
        self, group: Group, request: Any, call: Call
    ) -> AsyncIterator[sagas_pb2.WatchEvent]:
        assert self._router is not None
        try:
            async for event in self._router.watch(
                group, request, call.credential(), call.time_remaining_s
            ):
                yield event
        except grpc.RpcError as exc:
            raise Refusal(exc.code(), exc.details()) from None

    def _read_from(
        self, saga_id: str, seq: int
    ) -> tuple[list[log_pb2.Record], int | None, bool, bool]:
        """(records from `seq`, saga number or None, ended past `seq`, purged). `ended`
        is read first: an EndSaga applied between the two reads shows up in the
        records, never as "ended with nothing left to send"."""
        with self._node.raft.reading() as saga_log:
            had_ended = saga_log.has_ended(saga_id)
            records = saga_log.records_from(saga_id, seq)
            number = saga_log.saga_number(saga_id)
            ended = had_ended and not records
            purged = ended and saga_log.tombstone(saga_id) is not None
        return records, number, ended, purged

    async def _watch(
        self, saga_id: str, seq: int, sub: Subscription, call: Call
    ) -> AsyncIterator[sagas_pb2.WatchEvent]:
        """Records from `seq`: first what the store holds, then as they are pushed.
        A gap (the subscription fell behind, or a snapshot replaced the store)
        sends the stream back to the store from the last record delivered."""
        started = time.monotonic()
        known = False
        reread = True
        pending: list[tuple[int, log_pb2.Record]] = []
        while time.monotonic() - started < WATCH_MAX_S:
            if reread:
                loop = asyncio.get_running_loop()
                # Off the event loop: a snapshot install holds the store lock for long.
                records, number, ended, purged = await loop.run_in_executor(
                    None, self._read_from, saga_id, seq
                )
                known = known or number is not None
                if purged:
                    raise Refusal(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"saga {saga_id!r} has ended and its records were purged by the "
                        "retention policy; Get still answers",
                    )
                if ended:
                    return  # asked from past the saga's last record
                if not known and time.monotonic() - started > WATCH_UNKNOWN_GRACE_S:
                    # Unknown here after the grace: ask the leader whether it exists at
                    # all, so that a follower that lags does not answer NOT_FOUND.
                    await loop.run_in_executor(None, self._linearize, call)
                    again = await loop.run_in_executor(None, self._read_from, saga_id, 0)
                    if again[1] is None:
                        raise Refusal(grpc.StatusCode.NOT_FOUND, f"no saga with id {saga_id!r}")
                    known = True
                    continue  # reread is still set: read from `seq` again
                pending = [(seq + i, r) for i, r in enumerate(records)]
            reread = False
            for at, record in pending:
                if at < seq:
                    continue  # delivered already (read from the store, then pushed)
                if at > seq:
                    reread = True  # a gap: fetch the missing records from the store
                    break
                known = True
                yield sagas_pb2.WatchEvent(seq=at, record=record)
                seq += 1
                if record.HasField("end_saga"):
                    return
            if reread:
                continue
            await sub.wait(PUSH_RECHECK_S if known else WATCH_UNKNOWN_GRACE_S)
            pending, fell_behind = sub.take()
            reread = fell_behind or not pending


def _resolved_as(view: SagaView, vertex: str, resolved_by: str) -> bool:
    """Whether the log already holds this very resolution of `vertex` (Resolve is
    retried by clients after a lost answer: the same request must succeed again)."""
    return any(
        r.HasField("end_c") and r.end_c.vertex == vertex and r.end_c.resolved_by == resolved_by
        for r in view.records
    )


def _with_id(request: Any) -> sagas_pb2.SubmitRequest:
    """The Submit request with a saga id: a new one when the caller gave none (the
    id also decides the saga's Raft group)."""
    if request.saga_id:
        return request
    return sagas_pb2.SubmitRequest(
        definition=request.definition, payload=request.payload, saga_id=uuid.uuid4().hex
    )


def _check_saga_id(saga_id: str) -> None:
    error = codec.check_saga_id(saga_id)
    if error:
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, error)


def _payload_error(payload: bytes) -> str:
    if len(payload) > codec.MAX_PAYLOAD_BYTES:
        return f"the payload is {len(payload)} bytes; the limit is {codec.MAX_PAYLOAD_BYTES}"
    return ""


def codec_text(text: str) -> str:
    return text[: codec.MAX_TEXT_LEN]
