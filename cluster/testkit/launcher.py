"""A local cluster of 3 or 5 `sagalog-node` processes on loopback.

Used by `sagactl cluster up`, the demo, the tests and the benches. Every node is a
real OS process with its own data directory, Raft port and gRPC port; its output
goes to `<base>/<id>.log`. The launcher ends only the processes it started, by
PID. `cluster.json` in the base directory records them for `sagactl`.
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from saga.v1 import cluster_pb2, cluster_pb2_grpc

from cluster import auth as auth_mod
from cluster.client.sagactl import on_leader, remove_member
from cluster.grpcutil import channel_to
from cluster.localstate import STATE_FILE
from cluster.tls import TlsFiles, dev_files, make_dev_certs
from sagalog.raft import RaftTiming

# Ports this process handed out lately: the kernel may offer a port again as soon as
# its probe socket is closed, before whoever got it binds it (a cluster's node and a
# participant once got the same port and the node could not start).
RECENT_PORTS_KEPT = 4096
_recent_ports: OrderedDict[int, None] = OrderedDict()
_ports_lock = threading.Lock()


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports the kernel says are free now (held open together while chosen),
    none of them handed out by an earlier call in this process lately."""
    socks = []
    ports: list[int] = []
    with _ports_lock:
        try:
            for _ in range(n + RECENT_PORTS_KEPT):  # each skip keeps its socket open
                if len(ports) == n:
                    break
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((host, 0))
                socks.append(s)
                port = s.getsockname()[1]
                if port not in _recent_ports:
                    ports.append(port)
        finally:
            for s in socks:
                s.close()
        for port in ports:
            _recent_ports[port] = None
        while len(_recent_ports) > RECENT_PORTS_KEPT:
            _recent_ports.popitem(last=False)
    if len(ports) < n:
        raise OSError(f"could not find {n} free ports on {host}")
    return ports


def write_secret(path: str, secret: str) -> str:
    """Write `secret` to `path`, created with mode 0600 (never readable by others,
    not even for a moment); returns `path`."""
    if os.path.exists(path):
        os.remove(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret)
    return path


def stop_processes(procs: Iterable[subprocess.Popen], timeout_s: float) -> None:
    """SIGTERM each process that still runs (SIGCONT first: a stopped process cannot
    handle TERM); SIGKILL what is still running at the deadline. Only these PIDs."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


MAX_RETIRED_CHANNELS = 32  # replaced channels kept open for calls still on them


@dataclass
class NodeSpec:
    id: str
    raft_addr: str
    grpc_addr: str
    data_dir: str
    log_path: str
    pid: int = 0
    http_addr: str = ""  # the web page and /metrics ("": not served)
    command: list[str] = field(default_factory=list)  # as last started (rolling restarts)
    peers: list[str] = field(default_factory=list)  # ids of the peers on its command line
    join: bool = False  # started with --join (added by Cluster.AddNode)


class LocalCluster:
    program: tuple[str, ...] = ("-m", "cluster.runtime.node")  # what each node runs

    def __init__(
        self,
        base_dir: str,
        nodes: int = 3,
        host: str = "127.0.0.1",
        timing: RaftTiming | None = None,
        settings: dict[str, int] | None = None,
        password: str | None = None,
        extra_args: tuple[str, ...] = (),
        link_faults: bool = False,
        test_propose: bool = False,
        auth: bool = False,
        tls: bool = False,
        participant_tls: bool = False,
        http: bool = False,
        tls_hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
        id_prefix: str = "",
    ) -> None:
        """`auth`: an auth file with a token per role (`tokens`). `tls`: development
        certificates in `<base>/tls` (`tls_dir`; cluster.tls.make_dev_certs), every
        node serving gRPC with TLS and dialing its peers with it. `participant_tls`:
        the coordinator dials participants with TLS (TravelParticipants(tls_dir=...)).
        `http`: each node serves its web page and /metrics on a port of its own
        (`specs[id].http_addr`). `tls_hosts`: the names and addresses the development
        certificates are valid for. `id_prefix`: node ids are PREFIXn1, PREFIXn2, ..."""
        if nodes not in (3, 5):
            raise ValueError(f"a local cluster has 3 or 5 nodes, not {nodes}")
        self.base_dir = os.path.abspath(base_dir)
        os.makedirs(self.base_dir, exist_ok=True)
        self.timing = timing
        self.settings = settings or {}  # NodeConfig fields, e.g. compaction_min_entries
        # Every cluster gets a Raft password, local ones included (a random one per
        # cluster unless given), readable only by the user that starts it.
        self.password_file = write_secret(
            os.path.join(self.base_dir, "raft.secret"), password or secrets.token_urlsafe(32)
        )
        # With auth, a token per role (self.tokens); the launcher's own calls use admin's.
        self.tokens: dict[str, str] = {}
        if auth:
            auth_file = os.path.join(self.base_dir, "auth.toml")
            if os.path.exists(auth_file):
                os.remove(auth_file)
            for role in auth_mod.ROLES:
                self.tokens[role] = auth_mod.add_token(auth_file, f"test-{role}", role)
            extra_args = (*extra_args, "--auth-file", auth_file)
        self.metadata = auth_mod.bearer(self.tokens.get("admin"))  # for the launcher's calls
        self.tls_dir = os.path.join(self.base_dir, "tls") if (tls or participant_tls) else None
        self.client_tls: TlsFiles | None = None  # how the launcher and tests dial nodes
        if self.tls_dir is not None:
            make_dev_certs(self.tls_dir, tls_hosts)
            ca = os.path.join(self.tls_dir, "ca.pem")
            if tls:
                node = dev_files(self.tls_dir, "node")
                extra_args = (*extra_args, "--tls-cert", str(node.cert), "--tls-key")
                extra_args = (*extra_args, str(node.key), "--tls-ca", ca)
                self.client_tls = dev_files(self.tls_dir, "client")
            if participant_tls:
                extra_args = (*extra_args, "--participant-tls-ca", ca)
        # Tests and benches that append raw records turn on Cluster.Propose.
        self.extra_args = (*extra_args, "--test-propose") if test_propose else extra_args
        self.host = host
        self.http = http
        ports = free_ports(3 * nodes, host)
        self.specs = {
            f"{id_prefix}n{i + 1}": NodeSpec(
                id=f"{id_prefix}n{i + 1}",
                raft_addr=f"{host}:{ports[3 * i]}",
                grpc_addr=f"{host}:{ports[3 * i + 1]}",
                data_dir=os.path.join(self.base_dir, f"n{i + 1}"),
                log_path=os.path.join(self.base_dir, f"n{i + 1}.log"),
                http_addr=f"{host}:{ports[3 * i + 2]}" if http else "",
            )
            for i in range(nodes)
        }
        # With link_faults, each node reads Raft link faults from its own file
        # (sagalog.raft.LinkFaults); cluster.testkit.faults writes them.
        self.fault_files = (
            {n: os.path.join(self.base_dir, f"{n}.faults.json") for n in self.specs}
            if link_faults
            else {}
        )
        for spec in self.specs.values():  # the first members; their command lines keep these
            spec.peers = [n for n in self.specs if n != spec.id]
        # The nodes that vote: the first ones, then as add_node and remove_node change it.
        self.members: list[str] = list(self.specs)
        self.procs: dict[str, subprocess.Popen] = {}
        self._channels: dict[str, grpc.Channel] = {}
        # Channels replaced after a timeout: other threads may still have calls on
        # them, so they are closed later (the oldest past the bound, the rest at stop).
        self._retired: collections.deque[grpc.Channel] = collections.deque()

    # ---- processes -------------------------------------------------------------------

    def command(self, node_id: str) -> list[str]:
        spec = self.specs[node_id]
        cmd = [
            sys.executable,
            *self.program,
            "--id",
            spec.id,
            "--raft-addr",
            spec.raft_addr,
            "--grpc-addr",
            spec.grpc_addr,
            "--data-dir",
            spec.data_dir,
        ]
        for peer in spec.peers:
            other = self.specs[peer]
            cmd += ["--peer", f"{other.id}={other.raft_addr},{other.grpc_addr}"]
        if spec.join:
            cmd += ["--join"]
        cmd += ["--raft-password-file", self.password_file]
        if spec.http_addr:
            cmd += ["--http-addr", spec.http_addr, "--metrics-addr", spec.http_addr]
        if node_id in self.fault_files:
            cmd += ["--fault-file", self.fault_files[node_id]]
        if self.timing is not None or self.settings:
            cmd += ["--config", self._config_file()]
        return cmd + list(self.extra_args)

    def _config_file(self) -> str:
        """A TOML config with the settings and timing shared by every node."""
        path = os.path.join(self.base_dir, "common.toml")
        with open(path, "w") as f:
            for key, value in self.settings.items():
                f.write(f"{key} = {value}\n")
            if self.timing is not None:
                f.write("[timing]\n")
                for key, value in asdict(self.timing).items():
                    f.write(f"{key} = {value}\n")
        return path

    def start(self, node_id: str, detach: bool = False, env: dict[str, str] | None = None) -> None:
        """Start a node; `env` adds environment variables for this process only."""
        spec = self.specs[node_id]
        spec.command = self.command(node_id)
        log = open(spec.log_path, "ab")
        proc = subprocess.Popen(
            spec.command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
            env={**os.environ, **env} if env else None,
        )
        log.close()
        self.procs[node_id] = proc
        spec.pid = proc.pid
        self.save_state()

    def start_all(self, detach: bool = False) -> None:
        for node_id in self.specs:
            self.start(node_id, detach)

    @contextmanager
    def running(self, timeout_s: float = 15.0) -> Iterator[LocalCluster]:
        """Start every node and wait for a leader in office; on the way out stop them,
        after printing every node's log if something failed inside."""
        self.start_all()
        try:
            self.wait_for_leader(timeout_s)
            yield self
        except BaseException:
            print(self.logs(80))
            raise
        finally:
            self.stop_all()

    # ---- membership ------------------------------------------------------------------

    def add_node(self, node_id: str, timeout_s: float = 60.0) -> cluster_pb2.MembershipReply:
        """Start a new node that joins the current members, and add it through the
        leader (Cluster.AddNode: it catches up as a learner first)."""
        spec = self.start_joining(node_id)
        request = cluster_pb2.AddNodeRequest(
            node_id=node_id,
            raft_addr=spec.raft_addr,
            grpc_addr=spec.grpc_addr,
            timeout_ms=int(timeout_s * 1000),
        )
        reply = self._on_leader("AddNode", request, timeout_s + 5)
        self.members.append(node_id)
        return reply

    def start_joining(self, node_id: str) -> NodeSpec:
        """Start a new node with --join, its peers the current members (it votes
        once Cluster.AddNode adds it)."""
        if node_id in self.specs:
            raise ValueError(f"node {node_id} exists already")
        raft, grpc_, http = free_ports(3, self.host)
        self.specs[node_id] = NodeSpec(
            id=node_id,
            raft_addr=f"{self.host}:{raft}",
            grpc_addr=f"{self.host}:{grpc_}",
            data_dir=os.path.join(self.base_dir, node_id),
            log_path=os.path.join(self.base_dir, f"{node_id}.log"),
            http_addr=f"{self.host}:{http}" if self.http else "",
            peers=list(self.members),
            join=True,
        )
        self.start(node_id)
        return self.specs[node_id]

    def remove_node(self, node_id: str, timeout_s: float = 10.0) -> cluster_pb2.MembershipReply:
        """Remove a member through the leader (handing leadership over first when
        it is the one to go), then stop its process."""
        reply = remove_member(
            self._live_members(), self.client_tls, self.metadata, node_id, timeout_s
        )
        self.members.remove(node_id)
        self.kill(node_id, signal.SIGTERM)
        return reply

    def _on_leader(self, method: str, request: object, timeout_s: float) -> Any:
        """A Cluster call on the leader, asked again where leadership moved."""
        return on_leader(
            self._live_members(), self.client_tls, self.metadata, method, request, timeout_s
        )

    def _live_members(self) -> list[str]:
        return [self.specs[n].grpc_addr for n in self.members if self.alive(n)]

    def kill(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.get(node_id)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                proc.wait(timeout=15)
        self._drop_channel(node_id)

    def restart(self, node_id: str) -> None:
        self.kill(node_id)
        self.start(node_id)

    def alive(self, node_id: str) -> bool:
        proc = self.procs.get(node_id)
        return proc is not None and proc.poll() is None

    def stop_all(self, timeout_s: float = 10.0) -> None:
        """SIGTERM every node we started; SIGKILL what is still running at the deadline."""
        stop_processes(self.procs.values(), timeout_s)
        for node_id in list(self._channels):
            self._drop_channel(node_id)
        while self._retired:
            self._retired.popleft().close()

    def save_state(self) -> None:
        with open(os.path.join(self.base_dir, STATE_FILE), "w") as f:
            json.dump({"nodes": [asdict(s) for s in self.specs.values()]}, f, indent=2)

    def logs(self, tail_lines: int = 60) -> str:
        out = []
        for spec in self.specs.values():
            try:
                with open(spec.log_path, errors="replace") as f:
                    lines = f.readlines()[-tail_lines:]
            except OSError:
                lines = ["(no log)\n"]
            out.append(f"===== {spec.id} ({spec.log_path}) =====\n" + "".join(lines))
        return "\n".join(out)

    # ---- gRPC ------------------------------------------------------------------------

    def stub(self, node_id: str) -> cluster_pb2_grpc.ClusterStub:
        channel = self._channels.get(node_id)
        if channel is None:
            channel = channel_to(self.specs[node_id].grpc_addr, self.client_tls)
            self._channels[node_id] = channel
        return cluster_pb2_grpc.ClusterStub(channel)

    def _drop_channel(self, node_id: str) -> None:
        channel = self._channels.pop(node_id, None)
        if channel is not None:
            channel.close()

    def status(self, node_id: str, timeout_s: float = 1.0) -> cluster_pb2.StatusReply | None:
        try:
            return self.stub(node_id).Status(
                cluster_pb2.StatusRequest(), timeout=timeout_s, metadata=self.metadata
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                # A link that dropped packets leaves a connection whose TCP backoff can
                # outlast the fault by minutes: the next call dials a new one.
                self._retire_channel(node_id)
            return None

    def _retire_channel(self, node_id: str) -> None:
        channel = self._channels.pop(node_id, None)
        if channel is not None:
            self._retired.append(channel)
            if len(self._retired) > MAX_RETIRED_CHANNELS:
                self._retired.popleft().close()

    def wait_for_leader(
        self, timeout_s: float = 10.0, among: list[str] | None = None
    ) -> cluster_pb2.StatusReply:
        """Poll until every live node in `among` agrees on one leader and term, and
        that leader has committed its epoch. Returns the leader's status."""
        nodes = among if among is not None else [n for n in self.members if self.alive(n)]
        deadline = time.monotonic() + timeout_s
        last: list = []
        while time.monotonic() < deadline:
            replies = [self.status(n, 0.5) for n in nodes]
            last = replies
            if all(r is not None for r in replies):
                leaders = {(r.leader_id, r.term) for r in replies}  # type: ignore[union-attr]
                if len(leaders) == 1:
                    leader_id, _term = leaders.pop()
                    if leader_id and leader_id in nodes:
                        leader = self.status(leader_id, 0.5)
                        if leader is not None and leader.in_office:
                            return leader
            time.sleep(0.02)
        raise TimeoutError(f"no agreed leader among {nodes} within {timeout_s}s: {last}")

    def leader_id(self, timeout_s: float = 10.0) -> str:
        return self.wait_for_leader(timeout_s).id

    def wait_identical(
        self, timeout_s: float = 20.0, nodes: list[str] | None = None
    ) -> dict[str, cluster_pb2.DigestReply]:
        """Wait until the nodes (default: all) report the same store digest at the
        same applied index (replicas identical); return the digests. TimeoutError
        otherwise."""
        nodes = nodes or list(self.members)
        deadline = time.monotonic() + timeout_s
        digests: dict[str, cluster_pb2.DigestReply] = {}
        while time.monotonic() < deadline:
            try:
                digests = {
                    n: self.stub(n).Digest(
                        cluster_pb2.DigestRequest(), timeout=2, metadata=self.metadata
                    )
                    for n in nodes
                }
            except grpc.RpcError:  # a node still starting
                digests = {}
            if len(digests) == len(nodes) and (
                len({(d.sha256, d.applied_index) for d in digests.values()}) == 1
            ):
                return digests
            time.sleep(0.1)
        seen = {n: (d.sha256[:12], d.applied_index) for n, d in digests.items()}
        raise TimeoutError(f"replicas did not converge within {timeout_s}s: {seen}")


def load_state(base_dir: str) -> list[NodeSpec]:
    with open(os.path.join(base_dir, STATE_FILE)) as f:
        return [NodeSpec(**n) for n in json.load(f)["nodes"]]
