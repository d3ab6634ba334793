"""The `Cluster` gRPC service (operators: status, membership, raw proposals)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc
from saga.v1 import cluster_pb2, cluster_pb2_grpc, log_pb2

from cluster.runtime import statuses
from cluster.runtime.config import NodeConfig, shard_of
from cluster.shardmap import Group, ShardMap
from sagalog import codec
from sagalog import records as rec
from sagalog.proposer import ProposeError, Proposer
from sagalog.raft import SagaLogRaft, role_of
from sagalog.readindex import ReadRefused

MAX_PROPOSE_TIMEOUT_MS = 60_000
DEFAULT_TRANSFER_TIMEOUT_MS = 5_000
TRANSFER_POLL_S = 0.02
TRANSFER_RESEND_S = 0.5
# A leader confirms its leadership within a heartbeat round (milliseconds); one
# that cannot within this is cut off or deposed, and the reader tries elsewhere.
READ_INDEX_TIMEOUT_S = 2.0

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
        self._by_raft_addr = {p.raft_addr: p for p in config.peers}
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
        if leader_addr == self._config.raft_addr:
            reply.leader_id, reply.leader_grpc_addr = self._config.id, self._config.grpc_addr
        elif leader_addr in self._by_raft_addr:
            peer = self._by_raft_addr[leader_addr]
            reply.leader_id, reply.leader_grpc_addr = peer.id, peer.grpc_addr
        reply.members.add(
            id=self._config.id,
            raft_addr=self._config.raft_addr,
            grpc_addr=self._config.grpc_addr,
            connected=True,
        )
        connected = {n.id for n in raft.otherNodes if raft.isNodeConnected(n)}
        for peer in self._config.peers:
            reply.members.add(
                id=peer.id,
                raft_addr=peer.raft_addr,
                grpc_addr=peer.grpc_addr,
                connected=peer.raft_addr in connected,
            )
        with raft.reading() as log:
            reply.epoch = log.epoch().number
            for node_id, incarnation in log.members().items():
                reply.registered[node_id] = incarnation
        return reply

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
        peer = next((p for p in self._config.peers if p.id == request.node_id), None)
        connected = {n.id for n in raft.otherNodes if raft.isNodeConnected(n)}
        if peer is not None and peer.raft_addr in connected:
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
            peer = next((p for p in self._config.peers if p.id == request.to_node_id), None)
            if request.to_node_id == self._config.id:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this node already leads")
            if peer is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"no node {request.to_node_id!r}")
            assert peer is not None
            target = peer.raft_addr
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
                peer = self._by_raft_addr.get(status.leader)
                return cluster_pb2.TransferLeadershipReply(
                    leader_id=peer.id if peer is not None else status.leader, term=status.term
                )
        context.abort(
            grpc.StatusCode.UNAVAILABLE,
            f"no follower took leadership within {timeout_s:.1f} s "
            "(none held the leader's whole log when asked, or its election failed)",
        )
        raise AssertionError("unreachable")

    def ShardMap(self, request: Any, context: Any) -> cluster_pb2.ShardMapReply:
        return self._shard_map.to_reply(self._group)

    def _propose(self, batch: bytes, timeout_s: float, context: Any) -> log_pb2.BatchResult:
        _, proposer = self._started(context)
        try:
            return proposer.propose(batch, timeout_s)
        except ProposeError as exc:
            context.abort(statuses.propose_failed(exc.code), str(exc))
            raise  # unreachable: abort raises
