"""The `Cluster` gRPC service (operators: status, membership, raw proposals)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2

from cluster.runtime import statuses
from cluster.runtime.config import MAX_MEMBERS, MIN_MEMBERS, NodeConfig, check_node, shard_of
from cluster.shardmap import Group, ShardMap
from sagalog import codec
from sagalog import records as rec
from sagalog.membership import ADD, REMOVE, names, raft_node
from sagalog.proposer import ProposeError, Proposer
from sagalog.raft import MembershipRefused, SagaLogRaft, role_of
from sagalog.readindex import ReadRefused

log = logging.getLogger("sagacluster.cluster")

MAX_PROPOSE_TIMEOUT_MS = 60_000
DEFAULT_TRANSFER_TIMEOUT_MS = 5_000
TRANSFER_POLL_S = 0.02
TRANSFER_RESEND_S = 0.5
# A leader confirms its leadership within a heartbeat round (milliseconds); one
# that cannot within this is cut off or deposed, and the reader tries elsewhere.
READ_INDEX_TIMEOUT_S = 2.0
DEFAULT_ADD_TIMEOUT_MS = 60_000
MAX_ADD_TIMEOUT_MS = 600_000  # a new node may need a large snapshot first
DEFAULT_REMOVE_TIMEOUT_MS = 10_000
MEMBERSHIP_POLL_S = 0.02

_ROLES = {0: cluster_pb2.FOLLOWER, 1: cluster_pb2.CANDIDATE, 2: cluster_pb2.LEADER}


def raft_role(raft: SagaLogRaft) -> int:
    return _ROLES.get(role_of(raft), cluster_pb2.FOLLOWER)


class ClusterService(cluster_pb2_grpc.ClusterServicer):
    """Serves from the moment the process listens. Until Raft is attached (`attach`),
    Status answers with an empty view (a starting node has nothing registered) so
    that a new node's wipe check does not wait on peers that are starting too;
    every other method answers UNAVAILABLE."""

    def __init__(
        self,
        config: NodeConfig,
        registry: dict[str, bytes] | None = None,
        shard_map: ShardMap | None = None,
        group: Group | None = None,
    ) -> None:
        self._config = config
        if shard_map is None or group is None:
            shard_map, group = shard_of(config)
        self._shard_map = shard_map
        self._group = group
        # What this node's own store says about registrations, for Status answers
        # before Raft is attached (a peer restarting after a full outage still
        # tells a wiped node that it is known).
        self._registry_at_start = registry or {}
        self._raft: SagaLogRaft | None = None
        self._proposer: Proposer | None = None
        self._in_office: Callable[[], bool] = lambda: False
        self._office_term: Callable[[], int | None] = lambda: None
        self._hand_over: Callable[[bool], bool] = lambda on: False

    def attach(
        self,
        raft: SagaLogRaft,
        proposer: Proposer,
        in_office: Callable[[], bool],
        office_term: Callable[[], int | None],
        hand_over: Callable[[bool], bool],
    ) -> None:
        self._proposer = proposer
        self._in_office = in_office
        self._office_term = office_term
        self._hand_over = hand_over
        self._raft = raft

    def _started(self, context: Any) -> tuple[SagaLogRaft, Proposer]:
        if self._raft is None or self._proposer is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self._config.id} is starting")
        assert self._raft is not None and self._proposer is not None
        return self._raft, self._proposer

    def Status(self, request: Any, context: Any) -> cluster_pb2.StatusReply:
        raft = self._raft
        if raft is None:
            return cluster_pb2.StatusReply(
                id=self._config.id,
                role=cluster_pb2.FOLLOWER,
                registered=self._registry_at_start,
                group=self._group.index,
                groups=len(self._shard_map.groups),
            )
        status = raft.status()
        leader_addr = status.leader or ""
        reply = cluster_pb2.StatusReply(
            id=self._config.id,
            role=_ROLES.get(status.role, cluster_pb2.FOLLOWER),  # type: ignore[arg-type]
            term=status.term,
            commit_index=status.commit_index,
            applied_index=status.applied_index,
            ready=status.ready,
            in_office=self._in_office(),
            group=self._group.index,
            groups=len(self._shard_map.groups),
        )
        if leader_addr:
            reply.leader_id, reply.leader_grpc_addr = self.member_at(leader_addr)
        reply.member = raft.is_member()
        if not reply.member:  # joining or removed: it still says who it is
            reply.members.add(
                id=self._config.id,
                raft_addr=self._config.raft_addr,
                grpc_addr=self._config.grpc_addr,
                connected=True,
            )
        reply.members.extend(self._members(raft))
        with raft.reading() as log:
            reply.epoch = log.epoch().number
            for node_id, incarnation in log.members().items():
                reply.registered[node_id] = incarnation
        return reply

    def member_at(self, raft_addr: str) -> tuple[str, str]:
        """(node id, gRPC address) of the node at `raft_addr`, as the configuration
        names it (this node's command line before Raft starts); empty if unknown."""
        if raft_addr == self._config.raft_addr:
            return self._config.id, self._config.grpc_addr
        raft = self._raft
        node = raft.members().get(raft_addr) if raft is not None else None
        if node is not None and names(node)[0]:
            return names(node)
        peer = next((p for p in self._config.peers if p.raft_addr == raft_addr), None)
        return (peer.id, peer.grpc_addr) if peer is not None else ("", "")

    def _members(self, raft: SagaLogRaft) -> list[cluster_pb2.NodeInfo]:
        """The configuration this node uses, in id order."""
        connected = {n.id for n in raft.otherNodes if raft.isNodeConnected(n)}
        infos = []
        for address in raft.members():
            node_id, grpc_addr = self.member_at(address)
            infos.append(
                cluster_pb2.NodeInfo(
                    id=node_id,
                    raft_addr=address,
                    grpc_addr=grpc_addr,
                    connected=address == self._config.raft_addr or address in connected,
                )
            )
        return sorted(infos, key=lambda i: i.id)

    def _member_named(self, raft: SagaLogRaft, node_id: str) -> str | None:
        """The Raft address of the member with this id."""
        return next((a for a in raft.members() if self.member_at(a)[0] == node_id), None)

    def Propose(self, request: Any, context: Any) -> cluster_pb2.ProposeReply:
        if not self._config.test_propose:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "Cluster.Propose appends raw records: a testing aid, off unless the node runs "
                "with --test-propose; clients use the Sagas service",
            )
        records, error = codec.decode_batch(request.batch)
        forged = sorted({codec.body_name(r) for r in records} & codec.CLUSTER_BODIES)
        if not error and forged:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"cluster records ({', '.join(forged)}) come only from a node's own duties",
            )
        timeout_ms = request.timeout_ms or self._config.propose_timeout_ms
        if timeout_ms > MAX_PROPOSE_TIMEOUT_MS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_ms {timeout_ms} exceeds the limit {MAX_PROPOSE_TIMEOUT_MS}",
            )
        if len(request.batch) > codec.MAX_BATCH_BYTES:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the batch is {len(request.batch)} bytes; the limit is {codec.MAX_BATCH_BYTES}",
            )
        result = self._propose(request.batch, timeout_ms / 1000, context)
        return cluster_pb2.ProposeReply(result=result)

    def Digest(self, request: Any, context: Any) -> cluster_pb2.DigestReply:
        raft, _ = self._started(context)
        with raft.reading() as log:
            d = log.digest()
        return cluster_pb2.DigestReply(
            id=self._config.id,
            applied_index=d.applied_index,
            sha256=d.sha256,
            records=d.records,
            sagas=d.sagas,
        )

    def ReadSaga(self, request: Any, context: Any) -> cluster_pb2.ReadSagaReply:
        error = codec.check_saga_id(request.saga_id)
        if error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        raft, _ = self._started(context)
        with raft.reading() as log:
            records = log.records(request.saga_id)
        if not records:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no saga {request.saga_id!r} on this node")
        return cluster_pb2.ReadSagaReply(records=records)

    def ReadIndex(self, request: Any, context: Any) -> cluster_pb2.ReadIndexReply:
        raft, _ = self._started(context)
        term = self._office_term()
        if term is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self._config.id} is not in office")
        assert term is not None
        remaining = context.time_remaining()
        timeout_s = min(READ_INDEX_TIMEOUT_S, remaining if remaining is not None else 1e9)
        try:
            return cluster_pb2.ReadIndexReply(index=raft.read_index(timeout_s, term))
        except (ReadRefused, TimeoutError) as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot confirm leadership: {exc}")
            raise

    def ForgetMember(self, request: Any, context: Any) -> cluster_pb2.ForgetMemberReply:
        if request.node_id == self._config.id:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "a node cannot forget itself")
        raft, _ = self._started(context)
        address = self._member_named(raft, request.node_id)
        connected = {n.id for n in raft.otherNodes if raft.isNodeConnected(n)}
        if address is not None and address in connected:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {request.node_id} is connected: forget only a node that is stopped "
                "(its data directory was wiped and it must rejoin as a new incarnation)",
            )
        batch = codec.encode_batch([rec.forget_member(request.node_id)])
        result = self._propose(batch, self._config.propose_timeout_ms / 1000, context)
        if result.error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, result.error)
        return cluster_pb2.ForgetMemberReply(result=result.results[0])

    def TransferLeadership(self, request: Any, context: Any) -> cluster_pb2.TransferLeadershipReply:
        raft, _ = self._started(context)
        timeout_ms = request.timeout_ms or DEFAULT_TRANSFER_TIMEOUT_MS
        if timeout_ms > MAX_PROPOSE_TIMEOUT_MS:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"timeout_ms {timeout_ms} exceeds the limit {MAX_PROPOSE_TIMEOUT_MS}",
            )
        if raft_role(raft) != cluster_pb2.LEADER:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {self._config.id} is not the leader; ask the leader",
            )
        target = None
        if request.to_node_id:
            if request.to_node_id == self._config.id:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this node already leads")
            target = self._member_named(raft, request.to_node_id)
            if target is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no node {request.to_node_id!r}")
        # Leave office first: the coordinator stops and no new saga is admitted, so
        # the target stays caught up and two coordinators never act at once.
        if not self._hand_over(True):
            self._hand_over(False)
            context.abort(grpc.StatusCode.UNAVAILABLE, "the coordinator did not stop in time")
        try:
            return self._transfer(raft, target, timeout_ms / 1000, context)
        finally:
            self._hand_over(False)

    def _transfer(
        self, raft: SagaLogRaft, target: str | None, timeout_s: float, context: Any
    ) -> cluster_pb2.TransferLeadershipReply:
        deadline = time.monotonic() + timeout_s
        asked = 0.0
        while time.monotonic() < deadline:  # bounded by timeout_ms (at most 60 s)
            if time.monotonic() - asked >= TRANSFER_RESEND_S:
                # Asked again only after an election's worth of time: a follower
                # qualifies only when it holds every entry of the leader's log.
                raft.request_transfer(target)
                asked = time.monotonic()
            time.sleep(TRANSFER_POLL_S)
            status = raft.status()
            if status.leader is not None and status.leader != self._config.raft_addr:
                return cluster_pb2.TransferLeadershipReply(
                    leader_id=self.member_at(status.leader)[0] or status.leader,
                    term=status.term,
                )
        context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"no follower took leadership within {timeout_s:.1f} s "
            "(none held the leader's whole log when asked, or its election failed)",
        )
        raise AssertionError("unreachable")

    # ---- membership ------------------------------------------------------------------

    def _leader_for_change(self, context: Any) -> SagaLogRaft:
        raft, _ = self._started(context)
        if raft_role(raft) != cluster_pb2.LEADER:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"node {self._config.id} is not the leader; ask the leader",
            )
        if not self._in_office():
            # Its own entry of the term is not committed yet (pysyncobj refuses a
            # change until then): a moment after an election or a transfer.
            context.abort(grpc.StatusCode.UNAVAILABLE, "the leader is taking office; retry")
        if raft.change_pending():
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "another membership change is not committed yet; one change at a time",
            )
        return raft

    def AddNode(self, request: Any, context: Any) -> cluster_pb2.MembershipReply:
        timeout_s = _timeout_s(request.timeout_ms, DEFAULT_ADD_TIMEOUT_MS, MAX_ADD_TIMEOUT_MS)
        if timeout_s is None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"timeout_ms exceeds {MAX_ADD_TIMEOUT_MS}"
            )
        assert timeout_s is not None
        problem = _new_node_problem(request)
        if problem:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        raft, _ = self._started(context)
        members = raft.members()
        wanted = (request.node_id, request.grpc_addr)
        if request.raft_addr in members and self.member_at(request.raft_addr) == wanted:
            return cluster_pb2.MembershipReply(members=self._members(raft))  # a retry
        for address in members:
            node_id, grpc_addr = self.member_at(address)
            clash = (
                address == request.raft_addr
                or node_id == request.node_id
                or grpc_addr == request.grpc_addr
            )
            if clash:
                context.abort(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"member {node_id} ({address}, {grpc_addr}) has this id or an address",
                )
        raft = self._leader_for_change(context)
        if len(members) >= MAX_MEMBERS:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, f"a group has at most {MAX_MEMBERS} members"
            )
        node = raft_node(request.raft_addr, request.node_id, request.grpc_addr)
        deadline = time.monotonic() + timeout_s
        target = raft.raftCommitIndex
        raft.add_learner(node)
        try:
            # A learner first: it gets the log (a snapshot when compacted) and counts
            # toward no majority, so a slow catch-up never stalls commits.
            while (raft.learner_match(node.id) or 0) < target:
                if raft_role(raft) != cluster_pb2.LEADER:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "leadership moved; ask the leader")
                if time.monotonic() > deadline:
                    context.abort(
                        grpc.StatusCode.UNAVAILABLE,
                        f"node {request.node_id} did not catch up to entry {target} within "
                        f"{timeout_s:.0f} s (is it running with --join, reachable at "
                        f"{request.raft_addr}, with the same Raft password?)",
                    )
                time.sleep(MEMBERSHIP_POLL_S)
            self._change(raft, ADD, node, deadline, context)
        finally:
            raft.drop_learner(node.id)  # a no-op once it is a member
        log.info("node %s (%s) added to the configuration", request.node_id, request.raft_addr)
        return cluster_pb2.MembershipReply(members=self._members(raft))

    def RemoveNode(self, request: Any, context: Any) -> cluster_pb2.MembershipReply:
        timeout_s = _timeout_s(
            request.timeout_ms, DEFAULT_REMOVE_TIMEOUT_MS, MAX_PROPOSE_TIMEOUT_MS
        )
        if timeout_s is None:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"timeout_ms exceeds {MAX_PROPOSE_TIMEOUT_MS}"
            )
        assert timeout_s is not None
        raft = self._leader_for_change(context)
        deadline = time.monotonic() + timeout_s
        address = self._member_named(raft, request.node_id)
        if address is None:
            with raft.reading() as saga_log:
                registered = request.node_id in saga_log.members()
            if not registered:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no member {request.node_id!r}")
            # Removed already (a retry after a lost answer), or joining and never
            # added: only its registration is left to forget.
            self._forget(request.node_id, deadline, context)
            return cluster_pb2.MembershipReply(members=self._members(raft))
        if request.node_id == self._config.id:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the leader cannot remove itself: transfer leadership first",
            )
        if len(raft.members()) <= MIN_MEMBERS:
            context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a group keeps at least {MIN_MEMBERS} members: add one before removing one",
            )
        self._change(raft, REMOVE, raft.members()[address], deadline, context)
        self._forget(request.node_id, deadline, context)
        log.info("node %s (%s) removed from the configuration", request.node_id, address)
        return cluster_pb2.MembershipReply(members=self._members(raft))

    def _forget(self, node_id: str, deadline: float, context: Any) -> None:
        """Forget a removed node's registration: its id may come back later with a
        new data directory (a new incarnation)."""
        batch = codec.encode_batch([rec.forget_member(node_id)])
        self._propose(batch, max(0.001, deadline - time.monotonic()), context)

    def _change(
        self, raft: SagaLogRaft, kind: str, node: Any, deadline: float, context: Any
    ) -> None:
        try:
            raft.change_membership(kind, node, max(0.001, deadline - time.monotonic()))
        except MembershipRefused as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"refused: {exc}")
        except TimeoutError as exc:
            context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"{exc}; it may still commit: read the members in Cluster.Status",
            )

    def ShardMap(self, request: Any, context: Any) -> cluster_pb2.ShardMapReply:
        return self._shard_map.to_reply(self._group)

    def _propose(self, batch: bytes, timeout_s: float, context: Any) -> log_pb2.BatchResult:
        _, proposer = self._started(context)
        try:
            return proposer.propose(batch, timeout_s)
        except ProposeError as exc:
            context.abort(statuses.propose_failed(exc.code), str(exc))
            raise  # unreachable: abort raises


def _timeout_s(timeout_ms: int, default_ms: int, max_ms: int) -> float | None:
    """The call's timeout in seconds; None when it exceeds `max_ms`."""
    timeout_ms = timeout_ms or default_ms
    return None if timeout_ms > max_ms else timeout_ms / 1000


def _new_node_problem(request: Any) -> str:
    """Why an AddNode request cannot name a node ("" when it can)."""
    try:
        check_node(request.node_id, request.raft_addr, request.grpc_addr)
    except ValueError as exc:
        return str(exc)
    return ""
