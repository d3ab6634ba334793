"""A bare pysyncobj replicated counter behind the `saga.v1.Cluster` gRPC service.

This is the baseline of `bench/log_append.py`. The bench divides the Saga Log's
rate by this counter's rate, so everything around Raft must be the same as in a
`sagalog-node`, and only the Saga Log's own work (decoding, validating and writing
the records to RocksDB) must be missing:

* the same journal: `sagalog.journal.DurableJournal`, installed through
  `sagalog.raft.durable_journal`, fsynced as `sagalog.raft.SyncingTransport`
  does it (an answer after the fsync, the leader's fsync beside replication);
* the same `SyncObjConf`: `sagalog.raft.raft_conf`, the builder `SagaLogRaft`
  uses, without the snapshot hooks (pysyncobj's own pickle; no compaction runs
  during a bench: it starts at 50,000 journal entries or after 24 hours);
* the same `RaftTiming` (the default, or the `[timing]` table of `--config`,
  which is what `LocalCluster` passes to `sagalog-node`);
* the same gRPC server shape as `cluster.runtime.node.Node` (`DEFAULT_GRPC_WORKERS`
  worker threads, the same options) and a `Propose` that waits for its callback
  with a deadline and a cap on in-flight calls, like `sagalog.proposer.Proposer`;
* Raft entries of the same size: the replicated method receives the proposed
  batch bytes (and ignores them), so pickling, journal writes and network bytes
  match the Saga Log's.

Run: `python bench/counter_node.py --id n1 --raft-addr H:P --grpc-addr H:P
--data-dir DIR --peer n2=H:P,H:P --peer n3=H:P,H:P`. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import tomllib
from concurrent import futures
from typing import Any

import grpc
from pysyncobj import FAIL_REASON, SyncObj, replicated
from saga.v1 import cluster_pb2, cluster_pb2_grpc

from cluster.grpcutil import SERVER_KEEPALIVE_OPTIONS
from cluster.runtime.config import DEFAULT_GRPC_WORKERS, Peer, read_secret
from sagalog import codec
from sagalog.framecipher import EncryptedFrames, FrameCipher
from sagalog.journal import DurableJournal
from sagalog.proposer import DEFAULT_MAX_IN_FLIGHT
from sagalog.raft import (
    RaftTiming,
    SyncingTransport,
    durable_journal,
    raft_conf,
    raft_status,
    role_of,
)

log = logging.getLogger("bench.counter_node")

# Mirrored from cluster/ (copied, like the Raft configuration below).
GRPC_WORKERS = DEFAULT_GRPC_WORKERS  # as a sagalog-node
GRPC_MAX_MESSAGE_BYTES = codec.MAX_BATCH_BYTES + (1 << 20)  # cluster.runtime.node
PROPOSE_TIMEOUT_MS = 5000  # cluster.runtime.config.NodeConfig.propose_timeout_ms default

_REASON_NAMES = {getattr(FAIL_REASON, n): n for n in dir(FAIL_REASON) if n.isupper()}
_ROLES = {0: cluster_pb2.FOLLOWER, 1: cluster_pb2.CANDIDATE, 2: cluster_pb2.LEADER}


def raft_role(raft: SyncObj) -> int:
    return _ROLES.get(role_of(raft), cluster_pb2.FOLLOWER)


class CounterRaft(EncryptedFrames, SyncObj):  # type: ignore[misc]
    """A replicated counter with SagaLogRaft's journal, transport and configuration."""

    # A class attribute, so that the first increment creates the instance attribute
    # after SyncObj.__init__: pysyncobj's default serializer leaves out every
    # attribute that existed when its constructor ran.
    value = 0

    def __init__(
        self,
        self_addr: str,
        peer_addrs: list[str],
        data_dir: str,
        timing: RaftTiming,
        password: str | None,
    ) -> None:
        timing.validate()
        os.makedirs(data_dir, exist_ok=True)
        self._cipher = FrameCipher(password) if password else None
        # SyncingTransport reaches the journal through this attribute name.
        self._journal = DurableJournal(os.path.join(data_dir, "journal"))
        with durable_journal(self._journal):
            super().__init__(
                self_addr,
                peer_addrs,
                raft_conf(timing, data_dir, self_addr),
                transportClass=SyncingTransport,
            )

    @replicated
    def increment(self, batch: bytes) -> int:
        """Count one entry. `batch` only gives the entry the Saga Log's size."""
        self.value += 1
        return self.value


class CounterService(cluster_pb2_grpc.ClusterServicer):
    """`Propose` increments the counter once per call; `Status` lets the bench find
    the leader. The other methods of the service are left unimplemented."""

    def __init__(self, node_id: str, grpc_addr: str, raft_addr: str, peers: list[Peer]) -> None:
        self._id = node_id
        self._grpc_addr = grpc_addr
        self._raft_addr = raft_addr
        self._by_raft_addr = {p.raft_addr: p for p in peers}
        self._raft: CounterRaft | None = None
        self._slots = threading.BoundedSemaphore(DEFAULT_MAX_IN_FLIGHT)

    def attach(self, raft: CounterRaft) -> None:
        self._raft = raft

    def Status(self, request: Any, context: Any) -> cluster_pb2.StatusReply:
        raft = self._raft
        if raft is None:
            return cluster_pb2.StatusReply(id=self._id, role=cluster_pb2.FOLLOWER)
        status = raft_status(raft)
        reply = cluster_pb2.StatusReply(
            id=self._id,
            role=_ROLES.get(status.role, cluster_pb2.FOLLOWER),  # type: ignore[arg-type]
            term=status.term,
            commit_index=status.commit_index,
            applied_index=status.applied_index,
            ready=status.ready,
        )
        leader_addr = status.leader or ""
        if leader_addr == self._raft_addr:
            reply.leader_id, reply.leader_grpc_addr = self._id, self._grpc_addr
        elif leader_addr in self._by_raft_addr:
            peer = self._by_raft_addr[leader_addr]
            reply.leader_id, reply.leader_grpc_addr = peer.id, peer.grpc_addr
        return reply

    def Propose(self, request: Any, context: Any) -> cluster_pb2.ProposeReply:
        """Like ClusterService.Propose + Proposer.propose, with the counter as the
        state machine: wait for the entry to be applied, or fail with a gRPC code."""
        raft = self._raft
        if raft is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self._id} is starting")
        assert raft is not None
        timeout_s = (request.timeout_ms or PROPOSE_TIMEOUT_MS) / 1000
        if not self._slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many proposals in flight")
        try:
            done = threading.Event()
            outcome: list[tuple[Any, int]] = []

            def on_result(result: Any, reason: int) -> None:
                outcome.append((result, reason))
                done.set()

            raft.increment(request.batch, callback=on_result)
            if not done.wait(timeout_s):
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer in {timeout_s}s")
        finally:
            self._slots.release()
        _, reason = outcome[0]
        if reason != FAIL_REASON.SUCCESS:
            name = _REASON_NAMES.get(reason, str(reason))
            code = (
                grpc.StatusCode.RESOURCE_EXHAUSTED
                if reason == FAIL_REASON.QUEUE_FULL
                else grpc.StatusCode.UNAVAILABLE
            )
            context.abort(code, f"proposal failed ({name})")
        return cluster_pb2.ProposeReply()


def _timing(config_path: str | None) -> RaftTiming:
    """The `[timing]` table of a sagalog-node TOML file, or the defaults."""
    if not config_path:
        return RaftTiming()
    with open(config_path, "rb") as f:
        return RaftTiming(**tomllib.load(f).get("timing", {}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="counter_node", description=__doc__.split("\n\n")[0])
    p.add_argument("--id", required=True)
    p.add_argument("--raft-addr", required=True, metavar="HOST:PORT")
    p.add_argument("--grpc-addr", required=True, metavar="HOST:PORT")
    p.add_argument("--data-dir", required=True, metavar="DIR")
    p.add_argument("--peer", action="append", default=[], metavar="ID=RAFT,GRPC")
    p.add_argument("--config", help="TOML file; only its [timing] table is read")
    p.add_argument("--raft-password-file", metavar="FILE", help="as sagalog-node's")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {args.id} %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pysyncobj.syncobj").addFilter(
        lambda r: "truncating already-applied" not in r.getMessage()
    )
    peers = [Peer.parse(text) for text in args.peer]
    service = CounterService(args.id, args.grpc_addr, args.raft_addr, peers)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=GRPC_WORKERS),
        options=[
            ("grpc.max_receive_message_length", GRPC_MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", GRPC_MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            *SERVER_KEEPALIVE_OPTIONS,  # its clients ping while calls wait (cluster.grpcutil)
        ],
    )
    cluster_pb2_grpc.add_ClusterServicer_to_server(service, server)
    if server.add_insecure_port(args.grpc_addr) == 0:
        log.critical("cannot listen on --grpc-addr %s", args.grpc_addr)
        return 78
    server.start()
    password = read_secret(args.raft_password_file) if args.raft_password_file else None
    raft = CounterRaft(
        args.raft_addr,
        [peer.raft_addr for peer in peers],
        args.data_dir,
        _timing(args.config),
        password,
    )
    service.attach(raft)
    log.info("counter %s: raft %s, grpc %s", args.id, args.raft_addr, args.grpc_addr)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, lambda signum, frame: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop(grace=1.0).wait(2.0)
    raft.destroy_synchronous()
    log.info("counter %s stopped at %d", args.id, raft.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
