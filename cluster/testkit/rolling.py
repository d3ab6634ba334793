"""Rolling restart of a local cluster: every node in turn, the leader last.

Each follower: SIGTERM (it drains: health NOT_SERVING, then exits 0), start it
again, wait until gRPC health says it serves (it knows the leader and has caught
up). Then the leader hands leadership to a caught-up follower
(Cluster.TransferLeadership, Raft's TimeoutNow) and is restarted the same way.
One node is down at a time, so a majority always serves, and the leader's own
restart costs no election timeout.

The nodes are driven through `Nodes`: a LocalCluster this process started
(`InProcess`), or one `sagactl cluster up` started and left running (`Detached`,
from its state file and the command lines saved there).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Protocol, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from saga.v1 import cluster_pb2, cluster_pb2_grpc

from cluster.client.sagactl import node_status
from cluster.grpcutil import channel_to
from cluster.localstate import STATE_FILE
from cluster.testkit.launcher import LocalCluster, load_state
from cluster.tls import TlsFiles

STOP_TIMEOUT_S = 15.0  # a node that has not exited by then after SIGTERM is a failure
SERVE_TIMEOUT_S = 60.0  # a restarted node must serve again within this
TRANSFER_TIMEOUT_MS = 10_000


T = TypeVar("T")


class RollingRestartFailed(RuntimeError):
    pass


class Nodes(Protocol):
    tls: TlsFiles | None
    metadata: list[tuple[str, str]]

    def ids(self) -> list[str]: ...
    def grpc_addr(self, node_id: str) -> str: ...
    def stop(self, node_id: str) -> int | None: ...  # its exit code (None: killed)
    def start(self, node_id: str) -> None: ...


class InProcess:
    """A LocalCluster whose processes this process started."""

    def __init__(self, cluster: LocalCluster) -> None:
        self._cluster = cluster
        self.tls = cluster.client_tls
        self.metadata = cluster.metadata

    def ids(self) -> list[str]:
        return list(self._cluster.members)  # a removed node is not restarted

    def grpc_addr(self, node_id: str) -> str:
        return self._cluster.specs[node_id].grpc_addr

    def stop(self, node_id: str) -> int | None:
        self._cluster.kill(node_id, signal.SIGTERM)  # waits up to 15 s, then raises
        return self._cluster.procs[node_id].returncode

    def start(self, node_id: str) -> None:
        self._cluster.start(node_id)


class Detached:
    """The cluster `sagactl cluster up` started in `base_dir` (its state file holds
    each node's pid and command line)."""

    def __init__(self, base_dir: str, tls: TlsFiles | None, metadata: list[tuple[str, str]]):
        self._base_dir = base_dir
        self._specs = {s.id: s for s in load_state(base_dir)}
        missing = [s.id for s in self._specs.values() if not s.command]
        if missing:
            raise RollingRestartFailed(
                f"the state file in {base_dir} has no command line for {missing}: "
                "start the cluster again with this version's `sagactl cluster up`"
            )
        self.tls = tls
        self.metadata = metadata

    def ids(self) -> list[str]:
        return list(self._specs)

    def grpc_addr(self, node_id: str) -> str:
        return self._specs[node_id].grpc_addr

    def stop(self, node_id: str) -> int | None:
        pid = self._specs[node_id].pid
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return None
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while pid_alive(pid):
            if time.monotonic() > deadline:
                raise RollingRestartFailed(f"{node_id} (pid {pid}) did not exit after SIGTERM")
            time.sleep(0.05)
        return 0  # not our child: its code is not ours to read; it exited on TERM

    def start(self, node_id: str) -> None:
        spec = self._specs[node_id]
        with open(spec.log_path, "ab") as log:
            proc = subprocess.Popen(
                spec.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        spec.pid = proc.pid
        self._save()

    def _save(self) -> None:
        """Replaced whole (other sagactl calls read it meanwhile)."""
        path = os.path.join(self._base_dir, STATE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump({"nodes": [asdict(s) for s in self._specs.values()]}, f, indent=2)
        os.replace(path + ".tmp", path)


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not; one whose state cannot be read does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True  # cannot tell: assume it runs (starting another would clash)


def serving(nodes: Nodes, node_id: str) -> bool:
    try:
        with channel_to(nodes.grpc_addr(node_id), nodes.tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="saga.v1.Sagas"), timeout=1.0
            )
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def leader_of(nodes: Nodes) -> str | None:
    """The leader in office that every node answering agrees on (None: none now)."""
    replies = {
        r.id: r
        for r in (node_status(nodes.grpc_addr(n), nodes.tls, nodes.metadata) for n in nodes.ids())
        if r is not None
    }
    leaders = {r.leader_id for r in replies.values()}
    if len(leaders) != 1:
        return None
    leader = replies.get(leaders.pop())
    return leader.id if leader is not None and leader.in_office else None


def _until(what: str, value: Callable[[], T | None], timeout_s: float) -> T:
    """Poll `value` until it is neither None nor False; RollingRestartFailed at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = value()
        if got is not None and got is not False:
            return got
        if time.monotonic() > deadline:
            raise RollingRestartFailed(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.05)


def restart(nodes: Nodes, node_id: str, log: Callable[[str], None]) -> None:
    started = time.monotonic()
    code = nodes.stop(node_id)
    if code != 0:
        raise RollingRestartFailed(f"{node_id} did not stop cleanly on SIGTERM (exit {code})")
    nodes.start(node_id)
    _until(f"{node_id} serving again", lambda: serving(nodes, node_id), SERVE_TIMEOUT_S)
    log(f"{node_id} restarted and serving in {time.monotonic() - started:.2f} s")


def hand_over(nodes: Nodes, leader: str, log: Callable[[str], None]) -> str:
    """Ask `leader` to hand leadership over; return the node in office after it."""
    with channel_to(nodes.grpc_addr(leader), nodes.tls) as channel:
        reply = cluster_pb2_grpc.ClusterStub(channel).TransferLeadership(
            cluster_pb2.TransferLeadershipRequest(timeout_ms=TRANSFER_TIMEOUT_MS),
            timeout=TRANSFER_TIMEOUT_MS / 1000 + 5,
            metadata=nodes.metadata,
        )
    log(f"{leader} handed leadership to {reply.leader_id} (term {reply.term})")

    def successor() -> str | None:
        now = leader_of(nodes)
        return now if now != leader else None

    return _until(f"a new leader in office after {leader}", successor, 30)


def rolling_restart(nodes: Nodes, log: Callable[[str], None] = print) -> list[str]:
    """Restart every node once, followers first; a node found leading when its turn
    comes (the last one, or one that became leader meanwhile) first hands leadership
    to a caught-up follower. Returns the order. RollingRestartFailed when a step does
    not finish in time (the cluster is then left as it is)."""
    leader = _until("a leader in office", lambda: leader_of(nodes), 30)
    order = [n for n in nodes.ids() if n != leader] + [leader]
    for node_id in order:
        _until(
            f"every node serving before {node_id} stops",
            lambda: all(serving(nodes, n) for n in nodes.ids()),
            SERVE_TIMEOUT_S,
        )
        now = _until("a leader in office", lambda: leader_of(nodes), 30)
        if now == node_id:
            hand_over(nodes, node_id, log)
        restart(nodes, node_id, log)
    return order
