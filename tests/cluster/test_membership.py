"""Membership change under a steady saga load: 3 nodes to 5 and back to 3, and a
failed node replaced by a new one. New nodes catch up (by snapshot) as learners
before they vote; not one saga fails; the runs end with the saga guarantee at the
participants and identical replicas among the members."""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from saga.v1 import cluster_pb2, sagas_pb2
from test_sagas import check_guarantee

from cluster.client.saga_client import SagaClient
from cluster.testkit.launcher import LocalCluster
from cluster.testkit.travel import TravelParticipants, travel_definition

pytestmark = pytest.mark.cluster

CLIENTS = 4
MAX_SAGAS_PER_CLIENT = 2_000  # the load stops with the changes, or here
LOAD_DEADLINE_S = 180.0
# Small, so that the new nodes' catch-up starts from a snapshot.
SETTINGS = {"compaction_min_entries": 300}


@contextmanager
def steady_load(addrs: list[str], token: str, definition, tag: str) -> Iterator[dict]:
    """CLIENTS closed-loop clients running travel sagas until the block ends."""
    results: dict[str, int | str] = {}
    stop = threading.Event()

    def client(k: int) -> None:
        deadline = time.monotonic() + LOAD_DEADLINE_S
        with SagaClient(addrs, token=token, retry_deadline_s=30) as c:
            for i in range(MAX_SAGAS_PER_CLIENT):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                saga_id = f"{tag}-{k}-{i}"
                try:
                    results[saga_id] = c.run(definition, b"{}", saga_id, timeout_s=30).state
                except (grpc.RpcError, TimeoutError) as exc:
                    results[saga_id] = f"failed: {exc}"

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)  # the load runs before the first change
        yield results
        time.sleep(1.0)  # and after the last
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def members_seen(cluster: LocalCluster, node_id: str) -> list[str]:
    status = cluster.status(node_id, 2.0)
    assert status is not None, node_id
    return sorted(m.id for m in status.members)


def wait_members(cluster: LocalCluster, expected: list[str], timeout_s: float = 20.0) -> None:
    """Every member reports exactly `expected` as the configuration, and votes."""
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {n: cluster.status(n, 1.0) for n in expected}
        if all(
            s is not None and s.member and sorted(m.id for m in s.members) == sorted(expected)
            for s in seen.values()
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"members did not settle on {expected}: {seen}")
        time.sleep(0.1)


def finish(cluster: LocalCluster, parts, results: dict, addrs: list[str]) -> None:
    failed = {s: r for s, r in results.items() if r != sagas_pb2.COMPLETED}
    assert not failed, failed
    with SagaClient(addrs, token=cluster.tokens["operator"]) as c:
        check_guarantee(c, parts, sorted(results))
    cluster.wait_identical(30)


def test_three_nodes_grow_to_five_and_shrink_back_to_three_under_load(tmp_path) -> None:
    parts = TravelParticipants(str(tmp_path / "parts"))
    cluster = LocalCluster(str(tmp_path / "cluster"), nodes=3, auth=True, settings=SETTINGS)
    with parts, cluster.running():
        definition = travel_definition(parts.endpoints)
        first = [s.grpc_addr for s in cluster.specs.values()]
        with steady_load(first, cluster.tokens["client"], definition, "grow") as results:
            before = len(results)
            for node_id in ("n4", "n5"):
                reply = cluster.add_node(node_id)
                assert node_id in {m.id for m in reply.members}
            wait_members(cluster, ["n1", "n2", "n3", "n4", "n5"])
            # The newcomers hold the sagas logged before they joined (from a snapshot).
            assert (
                cluster.stub("n5")
                .ReadSaga(
                    cluster_pb2.ReadSagaRequest(saga_id="grow-0-0"),
                    timeout=5,
                    metadata=cluster.metadata,
                )
                .records
            )
            # The leader goes first: it hands leadership over, then is removed.
            old_leader = cluster.leader_id()
            cluster.remove_node(old_leader)
            # Another original goes, and keeps running a while: it never learns of
            # its removal (the members drop their links to it), and its election
            # timer disturbs no one.
            leading = cluster.leader_id()
            gone = next(n for n in ("n1", "n2", "n3") if n in cluster.members and n != leading)
            cluster._on_leader("RemoveNode", cluster_pb2.RemoveNodeRequest(node_id=gone), 15)
            cluster.members.remove(gone)
            left = sorted(cluster.members)
            wait_members(cluster, left)
            seen = cluster.wait_for_leader(10)
            time.sleep(2.0)  # several of its election timeouts
            still = cluster.wait_for_leader(10)
            assert (still.id, still.term) == (seen.id, seen.term)
            cluster.kill(gone, signal.SIGTERM)
            during = len(results) - before
        assert during > 0, "no saga ran during the changes"
        print(f"{len(results)} sagas, {during} of them during the membership changes")
        finish(cluster, parts, results, [cluster.specs[n].grpc_addr for n in cluster.members])
        # The removed nodes are gone from everyone's configuration, and the three
        # that are left elect a leader without them.
        leader = cluster.leader_id()
        cluster.kill(leader)
        cluster.members.remove(leader)
        assert cluster.wait_for_leader(15).id in set(left) - {leader}


def test_a_failed_node_is_replaced_by_a_new_one_under_load(tmp_path) -> None:
    parts = TravelParticipants(str(tmp_path / "parts"))
    cluster = LocalCluster(str(tmp_path / "cluster"), nodes=3, auth=True, settings=SETTINGS)
    with parts, cluster.running():
        definition = travel_definition(parts.endpoints)
        first = [s.grpc_addr for s in cluster.specs.values()]
        with steady_load(first, cluster.tokens["client"], definition, "swap") as results:
            failed = next(n for n in cluster.members if n != cluster.leader_id())
            cluster.kill(failed)  # its machine is gone, disk and all
            shutil.rmtree(cluster.specs[failed].data_dir)
            time.sleep(1.0)  # two of three carry on
            cluster.add_node("n4")  # 3 of 4 must now agree: n4 has caught up first
            request = cluster_pb2.RemoveNodeRequest(node_id=failed)
            cluster._on_leader("RemoveNode", request, 15)
            cluster.members.remove(failed)
            wait_members(cluster, sorted(cluster.members))
        finish(cluster, parts, results, [cluster.specs[n].grpc_addr for n in cluster.members])
        # n4 votes: with the old leader gone, the two left (n4 among them) elect one.
        leader = cluster.leader_id()
        cluster.kill(leader)
        cluster.members.remove(leader)
        assert cluster.wait_for_leader(15).id in set(cluster.members)


def test_membership_calls_refuse_what_would_break_the_cluster(tmp_path) -> None:
    with LocalCluster(str(tmp_path / "cluster"), nodes=3, auth=True).running() as cluster:
        leader = cluster.leader_id()
        follower = next(n for n in cluster.members if n != leader)
        spec = cluster.specs[follower]
        stub = cluster.stub(leader)

        def call(method: str, request, metadata=None) -> grpc.StatusCode:
            try:
                getattr(stub, method)(request, timeout=15, metadata=metadata or cluster.metadata)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        add = cluster_pb2.AddNodeRequest
        remove = cluster_pb2.RemoveNodeRequest
        operator = [("authorization", "Bearer " + cluster.tokens["operator"])]
        assert call(
            "AddNode", add(node_id="x", raft_addr="127.0.0.1:1", grpc_addr="127.0.0.1:2"), operator
        ) == (grpc.StatusCode.PERMISSION_DENIED)
        assert call("AddNode", add(node_id="bad id", raft_addr="a:1", grpc_addr="a:2")) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        # An id or an address a member has; the very same member is a retry: OK.
        clash = add(node_id=follower, raft_addr="127.0.0.1:9", grpc_addr="127.0.0.1:8")
        assert call("AddNode", clash) == grpc.StatusCode.ALREADY_EXISTS
        same = add(node_id=follower, raft_addr=spec.raft_addr, grpc_addr=spec.grpc_addr)
        assert call("AddNode", same) == grpc.StatusCode.OK
        # A node that is not running never catches up: refused in time, nothing added.
        ghost = add(
            node_id="ghost", raft_addr="127.0.0.1:9", grpc_addr="127.0.0.1:8", timeout_ms=1000
        )
        assert call("AddNode", ghost) == grpc.StatusCode.UNAVAILABLE
        assert members_seen(cluster, leader) == sorted(cluster.members)
        assert call("RemoveNode", remove(node_id="nobody")) == grpc.StatusCode.NOT_FOUND
        assert call("RemoveNode", remove(node_id=leader)) == grpc.StatusCode.FAILED_PRECONDITION
        assert call("RemoveNode", remove(node_id=follower)) == grpc.StatusCode.FAILED_PRECONDITION
        other = cluster.stub(follower)
        with pytest.raises(grpc.RpcError) as not_leader:
            other.AddNode(ghost, timeout=10, metadata=cluster.metadata)
        assert not_leader.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert members_seen(cluster, leader) == sorted(cluster.members)


ROUNDS = 3


def test_changes_survive_the_leader_being_killed_in_the_middle_of_them(tmp_path) -> None:
    """The leader dies at a seeded moment inside AddNode, and again inside
    RemoveNode, each round: the change may or may not have committed. Whatever
    happened, the members agree on one configuration (the restarted leader takes
    its own from its log, not its command line), the change can be made again,
    and no saga fails."""
    rng = random.Random(int(os.environ.get("MEMBERSHIP_SEED", "14")))
    parts = TravelParticipants(str(tmp_path / "parts"))
    cluster = LocalCluster(str(tmp_path / "cluster"), nodes=3, auth=True, settings=SETTINGS)
    with parts, cluster.running():
        definition = travel_definition(parts.endpoints)
        first = [s.grpc_addr for s in cluster.specs.values()]
        with steady_load(first, cluster.tokens["client"], definition, "kill") as results:
            for r in range(ROUNDS):
                joiner = f"j{r}"
                spec = cluster.start_joining(joiner)
                add = cluster_pb2.AddNodeRequest(
                    node_id=joiner, raft_addr=spec.raft_addr, grpc_addr=spec.grpc_addr
                )
                # Catching up takes most of a second: the kill lands in it or just after.
                settled = change_with_leader_killed(cluster, "AddNode", add, rng.uniform(0, 0.8))
                assert joiner in settled, settled
                cluster.members.append(joiner)
                # The node being removed may never hear of it (the members drop their
                # links to it as they append the removal): it is left out of every
                # wait from now on, and stopped once the removal has settled.
                cluster.members.remove(joiner)
                remove = cluster_pb2.RemoveNodeRequest(node_id=joiner)
                # A removal commits in milliseconds: the kill lands around the commit.
                delay = rng.uniform(0, 0.02)
                settled = change_with_leader_killed(cluster, "RemoveNode", remove, delay, joiner)
                assert joiner not in settled, settled
                cluster.kill(joiner, signal.SIGTERM)
            wait_members(cluster, ["n1", "n2", "n3"])
        finish(cluster, parts, results, first)


def change_with_leader_killed(
    cluster: LocalCluster, method: str, request, delay_s: float, spare: str = ""
) -> list[str]:
    """Call `method` on the leader, SIGKILL the leader `delay_s` later, restart it,
    and make the change again if it did not commit (asking the same again is safe).
    `spare`: the node being removed (it may lead until its removal commits). Returns
    the settled members."""
    leader = leader_of(cluster, spare)
    outcome: list[grpc.StatusCode] = []

    def call() -> None:
        try:
            getattr(cluster.stub(leader), method)(request, timeout=30, metadata=cluster.metadata)
            outcome.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            outcome.append(exc.code())

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(delay_s)
    cluster.kill(leader)
    caller.join(40)
    cluster.start(leader)  # its own command line: its configuration comes from its log
    seen = members_seen(cluster, leader_of(cluster, spare))
    survived = (request.node_id in seen) == (method == "AddNode")
    deadline = time.monotonic() + 60
    while True:  # bounded by the deadline
        now_leading = leader_of(cluster, spare)
        try:
            getattr(cluster.stub(now_leading), method)(
                request, timeout=30, metadata=cluster.metadata
            )
            break
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                break  # removed already: the first call's change committed
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)
    print(
        f"{method}, {leader} killed after {delay_s * 1000:.0f} ms: first answer "
        f"{outcome[0].name if outcome else 'none'}; the change "
        f"{'had survived' if survived else 'was lost and made again'}; {now_leading} led"
    )
    return members_seen(cluster, now_leading)


def leader_of(cluster: LocalCluster, spare: str, timeout_s: float = 20.0) -> str:
    """The leader the live members agree on, in office; the node being removed
    (`spare`) may be it, and is then asked to hand leadership over first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replies = [cluster.status(n, 0.5) for n in cluster.members if cluster.alive(n)]
        agreed = {(r.leader_id, r.term) for r in replies if r is not None}
        if len(agreed) == 1 and None not in replies:
            leader, _ = agreed.pop()
            status = cluster.status(leader, 0.5) if leader else None
            if status is not None and status.in_office:
                if leader != spare:
                    return leader
                try:
                    cluster.stub(leader).TransferLeadership(
                        cluster_pb2.TransferLeadershipRequest(timeout_ms=5000),
                        timeout=10,
                        metadata=cluster.metadata,
                    )
                except grpc.RpcError:
                    pass  # asked again below
        time.sleep(0.05)
    raise TimeoutError(f"no agreed leader among the live members within {timeout_s}s")
