"""Real three-process clusters: replication, crashes, power loss, torn tails, wiped nodes.

Every test ends with the global checks: replicas identical (digests) and every
acknowledged record present, once and in order, on every node.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import grpc
import pytest
from saga.v1 import cluster_pb2, log_pb2

from cluster.runtime.node import EXIT_REFUSED

pytestmark = pytest.mark.cluster


def followers(h) -> list[str]:
    leader = h.cluster.wait_for_leader(10).id
    return [n for n in h.addrs if n != leader]


def test_records_proposed_through_any_node_apply_identically(harness) -> None:
    for i in range(9):
        harness.commit_saga(f"s{i}", via=f"n{i % 3 + 1}")
    harness.wait_converged()
    harness.check_nothing_lost()
    statuses = [harness.cluster.status(n) for n in harness.addrs]
    assert len({(s.leader_id, s.term, s.epoch) for s in statuses}) == 1, statuses
    assert {m.id for m in statuses[0].members} == {"n1", "n2", "n3"}
    digest = harness.client.digest(harness.addrs["n1"])
    assert digest.sagas == 9 and digest.records == 90


def test_follower_killed_and_restarted_catches_up(harness) -> None:
    harness.commit_saga("before")
    victim = followers(harness)[0]
    harness.cluster.kill(victim, signal.SIGKILL)
    for i in range(10):
        harness.commit_saga(f"during-{i}")
    harness.cluster.start(victim)
    harness.wait_converged()
    harness.check_nothing_lost()


def test_leader_killed_new_leader_loses_nothing(harness) -> None:
    for i in range(5):
        harness.commit_saga(f"before-{i}")
    old = harness.cluster.wait_for_leader(10)
    harness.cluster.kill(old.id, signal.SIGKILL)
    survivors = [n for n in harness.addrs if n != old.id]
    new = harness.cluster.wait_for_leader(10, among=survivors)
    assert new.id != old.id and new.term > old.term and new.epoch > old.epoch
    harness.commit_saga("after", via=survivors[0])
    harness.check_nothing_lost(survivors)
    harness.cluster.start(old.id)
    harness.wait_converged()
    harness.check_nothing_lost()


def cut_to_synced(journal: str) -> int:
    """What a power loss leaves: the journal as of its last fsync."""
    with open(journal + ".synced", "rb") as f:
        synced = int.from_bytes(f.read(8), "big")
    size = os.path.getsize(journal)
    assert 0 < synced <= size
    os.truncate(journal, synced)
    return size - synced


@pytest.mark.parametrize("victims", ["one", "all"])
def test_journal_cut_back_to_last_fsync_loses_nothing_acknowledged(harness, victims) -> None:
    for i in range(10):
        harness.commit_saga(f"s{i}")
    nodes = list(harness.addrs) if victims == "all" else followers(harness)[:1]
    for n in nodes:
        harness.cluster.kill(n, signal.SIGKILL)
    for n in nodes:
        cut_to_synced(os.path.join(harness.cluster.specs[n].data_dir, "journal"))
        # The store (applied state) is the journal's derivative: a power loss may take
        # its unsynced tail too, so start it from nothing and replay the journal.
        shutil.rmtree(os.path.join(harness.cluster.specs[n].data_dir, "db"))
    for n in nodes:
        harness.cluster.start(n)
    harness.cluster.wait_for_leader(15)
    harness.commit_saga("after")
    harness.wait_converged()
    harness.check_nothing_lost()


def test_torn_tail_is_cut_not_applied(harness) -> None:
    for i in range(5):
        harness.commit_saga(f"s{i}")
    victim = followers(harness)[0]
    harness.cluster.kill(victim, signal.SIGKILL)
    journal = os.path.join(harness.cluster.specs[victim].data_dir, "journal")
    with open(journal, "ab") as f:
        # A header promising 4000 bytes of payload, then only some of them.
        f.write((4000).to_bytes(4, "big") + os.urandom(300))
    harness.cluster.start(victim)
    harness.commit_saga("after")
    harness.wait_converged()
    harness.check_nothing_lost()
    with open(harness.cluster.specs[victim].log_path) as f:
        assert "cut" in f.read().lower()


def test_wiped_node_is_refused_until_forgotten(harness) -> None:
    harness.commit_saga("s0")
    victim = followers(harness)[0]
    spec = harness.cluster.specs[victim]
    harness.cluster.kill(victim, signal.SIGKILL)
    shutil.rmtree(spec.data_dir)
    proc = subprocess.run(
        harness.cluster.command(victim), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == EXIT_REFUSED, proc.stderr[-2000:]
    assert "forget-node" in proc.stderr
    survivor = next(n for n in harness.addrs if n != victim)
    with pytest.raises(grpc.RpcError) as refused:
        harness.client.stub(harness.addrs[survivor]).ForgetMember(
            cluster_pb2.ForgetMemberRequest(node_id=survivor), timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    reply = harness.client.stub(harness.addrs[survivor]).ForgetMember(
        cluster_pb2.ForgetMemberRequest(node_id=victim), timeout=10
    )
    assert reply.result.verdict == log_pb2.ACCEPTED
    shutil.rmtree(spec.data_dir, ignore_errors=True)
    harness.cluster.start(victim)
    harness.commit_saga("s1")
    harness.wait_converged()
    harness.check_nothing_lost()
    status = harness.cluster.status(victim)
    assert status is not None and victim in status.registered


def test_garbage_given_to_the_replicated_method_is_rejected_and_the_cluster_commits_on(
    harness,
) -> None:
    stub = harness.client.stub(harness.addrs["n1"])
    for junk in [b"\xff\xfe\xfd not protobuf", b"\x08\x09", os.urandom(2000)]:
        reply = stub.Propose(cluster_pb2.ProposeRequest(batch=junk), timeout=10)
        assert reply.result.error, junk
    harness.commit_saga("after-garbage")
    harness.wait_converged()
    harness.check_nothing_lost()


def test_sigterm_stops_a_node_cleanly(harness) -> None:
    victim = followers(harness)[0]
    proc = harness.cluster.procs[victim]
    proc.terminate()
    assert proc.wait(timeout=15) == 0
    harness.cluster.start(victim)
    harness.commit_saga("after")
    harness.wait_converged()


def test_encrypted_raft_traffic(make_cluster) -> None:
    h = make_cluster(3, password="correct horse battery staple")
    h.commit_saga("secret")
    h.wait_converged()
    h.check_nothing_lost()


def test_five_nodes_survive_two_failures(make_cluster) -> None:
    h = make_cluster(5)
    h.commit_saga("s0")
    leader = h.cluster.wait_for_leader(10).id
    victims = [leader] + [n for n in h.addrs if n != leader][:1]
    for v in victims:
        h.cluster.kill(v, signal.SIGKILL)
    alive = [n for n in h.addrs if n not in victims]
    h.cluster.wait_for_leader(15, among=alive)
    h.commit_saga("s1", via=alive[0])
    h.check_nothing_lost(alive)
    for v in victims:
        h.cluster.start(v)
    h.wait_converged()
    h.check_nothing_lost()


def test_no_write_is_acknowledged_without_a_majority(harness) -> None:
    harness.commit_saga("s0")
    leader = harness.cluster.wait_for_leader(10).id
    others = [n for n in harness.addrs if n != leader]
    for n in others:
        harness.cluster.kill(n, signal.SIGKILL)
    epoch = harness.cluster.status(leader).epoch
    from sagalog.records import completed_saga as travel_records

    with pytest.raises((TimeoutError, grpc.RpcError)):
        harness.client.propose(
            travel_records("lonely", epoch), via=harness.addrs[leader], deadline_s=2
        )
    for n in others:
        harness.cluster.start(n)
    harness.cluster.wait_for_leader(15)
    harness.wait_converged()
    harness.check_nothing_lost()
    # The lonely saga may commit later (its entry can survive in the old leader's
    # log), but never partly: all of its records or none.
    reply = harness.client.stub(harness.addrs[others[0]])
    try:
        got = reply.ReadSaga(cluster_pb2.ReadSagaRequest(saga_id="lonely"), timeout=5).records
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
        got = []
    assert len(got) in (0, 10)


def test_leader_failover_is_measured_over_repeated_kills(harness) -> None:
    """Kill the leader with SIGKILL again and again: each time a new leader accepts
    writes, nothing acknowledged is lost, and replicas converge after the rejoin."""
    times = []
    for trial in range(int(os.environ.get("FAILOVER_TRIALS", "5"))):
        old = harness.cluster.wait_for_leader(15)
        harness.commit_saga(f"t{trial}-before")
        killed_at = time.monotonic()
        harness.cluster.kill(old.id, signal.SIGKILL)
        survivors = [n for n in harness.addrs if n != old.id]
        harness.commit_saga(f"t{trial}-after", via=survivors[trial % 2])
        times.append(time.monotonic() - killed_at)
        harness.cluster.start(old.id)
        harness.wait_converged()
        harness.check_nothing_lost()
    print(f"failover: kill -> next acknowledged write, seconds: {[round(t, 2) for t in times]}")


def test_an_idle_cluster_elects_in_one_round_after_its_leader_dies(harness) -> None:
    """Followers never talk to each other while a leader lives. pysyncobj closed
    such an idle link on the first message sent over it (a read timeout checked at
    send time), so the first vote request after a leader's death was lost and every
    failover took two election rounds (term + 2). Keepalives fix that; a genuine
    split vote can still cost a round now and then, so one clean round in three
    is required (without keepalives: none)."""
    rounds = []
    for _ in range(3):
        old = harness.cluster.wait_for_leader(15)
        time.sleep(1.5)  # idle for longer than the connection timeout (1 s)
        harness.cluster.kill(old.id, signal.SIGKILL)
        new = harness.cluster.wait_for_leader(15)
        rounds.append(new.term - old.term)
        harness.cluster.start(old.id)
        harness.wait_converged()
    assert 1 in rounds, f"terms rose by {rounds} per failover"


def test_snapshots_compact_the_journal_and_bring_a_lagging_follower_up(make_cluster) -> None:
    """With a small compaction threshold the leader snapshots (RocksDB checkpoint via
    pysyncobj's serializer hooks) and drops its journal prefix; a follower that was
    down all along can then only catch up by installing that snapshot."""
    h = make_cluster(3, settings={"compaction_min_entries": 100})
    victim = followers(h)[0]
    h.cluster.kill(victim, signal.SIGKILL)
    for i in range(130):
        h.commit_saga(f"s{i}")
    leader = h.cluster.wait_for_leader(10).id
    assert os.path.exists(os.path.join(h.cluster.specs[leader].data_dir, "snapshot"))
    h.cluster.start(victim)
    h.wait_converged(timeout_s=30)
    h.check_nothing_lost()
    with open(h.cluster.specs[victim].log_path) as f:
        assert "installed snapshot" in f.read()
    # Every node restarts from its own snapshot plus journal, and still agrees.
    for n in list(h.addrs):
        h.cluster.kill(n, signal.SIGKILL)
    for n in h.addrs:
        h.cluster.start(n)
    h.cluster.wait_for_leader(15)
    h.commit_saga("after-restart")
    h.wait_converged(timeout_s=30)
    h.check_nothing_lost()


def test_a_journal_damaged_in_the_middle_stops_the_node_instead_of_losing_entries(
    harness,
) -> None:
    for i in range(5):
        harness.commit_saga(f"before-damage-{i}")
    victim = followers(harness)[0]
    proc = harness.cluster.procs[victim]
    proc.terminate()
    assert proc.wait(timeout=15) == 0
    journal = os.path.join(harness.cluster.specs[victim].data_dir, "journal")
    size = os.path.getsize(journal)
    with open(journal, "r+b") as f:  # one flipped byte half-way: bit rot, not a torn write
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    harness.cluster.start(victim)
    assert harness.cluster.procs[victim].wait(timeout=30) == 74
    assert "journal is corrupt" in harness.cluster.logs(20)
    assert os.path.getsize(journal) == size  # nothing was cut
    harness.commit_saga("after-damage", via=next(n for n in harness.addrs if n != victim))
