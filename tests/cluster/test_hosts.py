"""Nodes on separate hosts: three network namespaces, each with its own address on
a bridge (veth pairs), one node in each with TLS, tokens and a Raft password; the
participants and the client on the bridge's own address. Sagas run; then the
leader's namespace is cut off (iptables drops everything on its link) while
sagas go on, and healed; then one namespace drops a share of its packets at
random (iptables -m statistic; this kernel has no tc netem) while sagas go on,
and healed. Ends with the saga guarantee and identical replicas.

Needs root, `ip` and `iptables` (make test installs iptables where it may); it
skips and says why otherwise, unless SAGA_REQUIRE_HOSTS=1 (set by .ci/run).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest
from saga.v1 import sagas_pb2
from test_sagas import check_guarantee

from cluster.client.saga_client import SagaClient
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.travel import TravelParticipants, travel_definition

pytestmark = [pytest.mark.cluster, pytest.mark.hosts]

NODES = 3
SAGAS_PER_PHASE = 12
DROP_PROBABILITY = 0.2
RAFT_PORT, GRPC_PORT = 7000, 8000


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=20)


def _missing() -> str | None:
    """Why namespaces cannot be built here (None: they can)."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"no {tool} (apt-get install iproute2 iptables)"
    probe = f"sagaprobe{os.getpid()}"
    try:
        _run("ip", "netns", "add", probe)
        _run("ip", "netns", "exec", probe, "iptables", "-L", "-n")
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"network namespaces or iptables unusable here: {exc}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    """A bridge in this namespace and NODES namespaces on it, each a 'host'."""

    def __init__(self) -> None:
        # Random names and a subnet no interface here uses: runs side by side (or a
        # killed run's leftovers) never collide, and tear_down deletes only ours.
        used = subprocess.run(
            ["ip", "-o", "addr"], capture_output=True, text=True, timeout=10
        ).stdout
        free = [k for k in range(20, 250) if f" 10.213.{k}." not in used]
        k = secrets.choice(free)
        tag = secrets.token_hex(2)
        self.subnet = f"10.213.{k}"
        self.bridge = f"sbr{tag}"
        self.bridge_ip = f"{self.subnet}.254"
        self.namespaces = {f"n{i}": f"saga{tag}n{i}" for i in range(1, NODES + 1)}
        self.ips = {f"n{i}": f"{self.subnet}.{i}" for i in range(1, NODES + 1)}
        self._veths = [f"sv{tag}n{i}" for i in range(1, NODES + 1)]
        self._made: list[tuple[str, ...]] = []  # how to delete what build() made

    def build(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._made.append(("ip", "link", "del", self.bridge))
        _run("ip", "addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        for (node, ns), veth in zip(self.namespaces.items(), self._veths, strict=True):
            peer = veth.replace("sv", "sp")
            _run("ip", "netns", "add", ns)
            self._made.append(("ip", "netns", "del", ns))  # its end of the veth pair too
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            self._made.append(("ip", "link", "del", veth))
            _run("ip", "link", "set", peer, "netns", ns)
            _run("ip", "link", "set", veth, "master", self.bridge)
            _run("ip", "link", "set", veth, "up")
            inside = ("ip", "netns", "exec", ns)
            _run(*inside, "ip", "link", "set", peer, "name", "eth0")
            _run(*inside, "ip", "addr", "add", f"{self.ips[node]}/24", "dev", "eth0")
            _run(*inside, "ip", "link", "set", "eth0", "up")
            _run(*inside, "ip", "link", "set", "lo", "up")

    def tear_down(self) -> None:
        for command in reversed(self._made):
            subprocess.run(command, capture_output=True, timeout=20)

    def iptables(self, node: str, *rule: str) -> None:
        _run("ip", "netns", "exec", self.namespaces[node], "iptables", *rule)

    def cut_off(self, node: str) -> None:
        self.iptables(node, "-A", "INPUT", "-i", "eth0", "-j", "DROP")
        self.iptables(node, "-A", "OUTPUT", "-o", "eth0", "-j", "DROP")

    def lossy(self, node: str, probability: float) -> None:
        for chain, way in (("INPUT", "-i"), ("OUTPUT", "-o")):
            self.iptables(
                node, "-A", chain, way, "eth0", "-m", "statistic", "--mode", "random",
                "--probability", str(probability), "-j", "DROP",
            )  # fmt: skip

    def heal(self, node: str) -> None:
        self.iptables(node, "-F")


class NamespacedCluster(LocalCluster):
    """A LocalCluster whose node k runs in namespace k, on that namespace's address."""

    def __init__(self, base_dir: str, hosts: Hosts) -> None:
        super().__init__(
            base_dir,
            nodes=NODES,
            auth=True,
            tls=True,
            participant_tls=True,
            tls_hosts=(*hosts.ips.values(), hosts.bridge_ip, "127.0.0.1", "localhost"),
        )
        self.hosts = hosts
        for node, spec in self.specs.items():
            spec.raft_addr = f"{hosts.ips[node]}:{RAFT_PORT}"
            spec.grpc_addr = f"{hosts.ips[node]}:{GRPC_PORT}"

    def command(self, node_id: str) -> list[str]:
        return ["ip", "netns", "exec", self.hosts.namespaces[node_id], *super().command(node_id)]


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    why = _missing()
    if why is not None:
        if os.environ.get("SAGA_REQUIRE_HOSTS") == "1":
            pytest.fail(f"SAGA_REQUIRE_HOSTS=1 but {why}")
        pytest.skip(f"separate-hosts test skipped: {why}")
    h = Hosts()
    try:
        h.build()
        yield h
    finally:
        h.tear_down()


def test_nodes_on_separate_hosts_survive_a_partition_and_lossy_links(hosts, tmp_path) -> None:
    cluster = NamespacedCluster(str(tmp_path / "cluster"), hosts)
    assert cluster.tls_dir is not None and cluster.client_tls is not None
    parts = TravelParticipants(
        str(tmp_path / "parts"), host=hosts.bridge_ip, tls_dir=cluster.tls_dir
    )
    files = cluster.client_tls
    with parts, cluster.running(timeout_s=30):
        definition = travel_definition(parts.endpoints, timeout_ms=3000, max_attempts=5)
        addrs = [s.grpc_addr for s in cluster.specs.values()]
        done: dict[str, int | str] = {}

        def client(role: str) -> SagaClient:
            return SagaClient(
                addrs,
                token=cluster.tokens[role],
                tls_ca=str(files.ca),
                tls_cert=str(files.cert),
                tls_key=str(files.key),
                retry_deadline_s=60,
            )

        def run_phase(name: str) -> None:
            with client("client") as saga_client:
                for i in range(SAGAS_PER_PHASE):
                    saga_id = f"{name}-{i}"
                    try:
                        done[saga_id] = saga_client.run(definition, b"{}", saga_id, 60).state
                    except (grpc.RpcError, TimeoutError) as exc:
                        done[saga_id] = f"failed: {exc}"

        run_phase("healthy")
        leader = cluster.leader_id()
        hosts.cut_off(leader)  # the leader's host drops off the network
        run_phase("partitioned")
        others = [n for n in cluster.specs if n != leader]
        new_leader = cluster.wait_for_leader(30, among=others).id
        hosts.heal(leader)
        lossy = cluster.wait_for_leader(30).id  # the leader now (the healed one may lead)
        assert new_leader != leader  # the majority failed over
        hosts.lossy(lossy, DROP_PROBABILITY)  # now the leader's link loses packets
        run_phase("lossy")
        hosts.heal(lossy)

        failed = {s: r for s, r in done.items() if r != sagas_pb2.COMPLETED}
        assert not failed, failed
        assert len(done) == 3 * SAGAS_PER_PHASE
        with client("operator") as operator:
            check_guarantee(operator, parts, sorted(done))
        cluster.wait_identical(30)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not all(cluster.alive(n) for n in cluster.specs):
            time.sleep(0.1)
        assert all(cluster.alive(n) for n in cluster.specs)
