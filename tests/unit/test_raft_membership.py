"""Membership change: the configuration computed from the log (pure and in the
journal), and real replicas in this process (loopback sockets) adding a learner
that catches up before it votes, removing a node, and restarting with the
configuration their log holds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import pytest

from cluster.testkit.launcher import free_ports
from sagalog import codec
from sagalog import records as rec
from sagalog.journal import DurableJournal
from sagalog.membership import ADD, REMOVE, change_command, change_in, fold, names, raft_node
from sagalog.raft import MembershipRefused, RaftTiming, SagaLogRaft

FAST = RaftTiming(tick_ms=5, rejoin_grace_ms=500)
WAIT_S = 20.0


def _node(port: int, name: str):
    return raft_node(f"127.0.0.1:{port}", name, f"127.0.0.1:{port + 1}")


def test_the_configuration_is_the_base_with_every_change_applied_in_order() -> None:
    a, b, c, d = (_node(p, n) for p, n in [(1, "a"), (2, "b"), (3, "c"), (4, "d")])
    base = {n.id: n for n in (a, b, c)}
    assert fold(base, [(ADD, d), (REMOVE, a)]).keys() == {b.id, c.id, d.id}
    # The last change about a node decides, whatever the base already says.
    assert fold(base, [(REMOVE, d), (ADD, d)]).keys() == {a.id, b.id, c.id, d.id}
    assert fold(base, [(ADD, a), (REMOVE, a)]).keys() == {b.id, c.id}
    kind, node = change_in(change_command(ADD, d))
    assert kind == ADD and node == d and names(node) == ("d", "127.0.0.1:5")
    assert change_in(b"\x00regular") is None


def test_the_journal_follows_changes_through_truncation_compaction_and_restart(tmp_path) -> None:
    a, b, c, d, e = (_node(p, n) for p, n in [(1, "a"), (2, "b"), (3, "c"), (4, "d"), (5, "e")])
    path = str(tmp_path / "journal")
    journal = DurableJournal(path)
    journal.set_base({n.id: n for n in (a, b, c)})
    for idx in range(1, 4):
        journal.add(b"\x00x", idx, 1)
    journal.add(change_command(ADD, d), 4, 1)
    journal.add(b"\x00x", 5, 1)
    journal.add(change_command(REMOVE, a), 6, 2)
    assert journal.members().keys() == {b.id, c.id, d.id}
    assert journal.members_through(5).keys() == {a.id, b.id, c.id, d.id}
    assert [i for i, _ in journal.changes_after(4)] == [6]
    # An uncommitted suffix dropped: its change goes with it.
    journal.deleteEntriesFrom(5)  # list position 5: index 6
    assert journal.members().keys() == {a.id, b.id, c.id, d.id}
    journal.add(change_command(ADD, e), 6, 3)
    # Compaction folds what it drops into the base.
    journal.deleteEntriesTo(4)  # keeps indexes 5 and 6
    assert journal.base.keys() == {a.id, b.id, c.id, d.id}
    assert journal.members().keys() == {a.id, b.id, c.id, d.id, e.id}
    journal.sync()
    journal.close()
    reopened = DurableJournal(path)
    reopened.set_base({n.id: n for n in (a, b, c, d)})  # what a snapshot would say
    assert reopened.members().keys() == {a.id, b.id, c.id, d.id, e.id}
    assert names(reopened.members()[e.id]) == ("e", "127.0.0.1:6")
    reopened.close()


def test_the_leader_appends_one_change_at_a_time_and_adds_only_caught_up_learners(
    tmp_path,
) -> None:
    a, b, c, d = (_node(p, n) for p, n in [(1, "a"), (2, "b"), (3, "c"), (4, "d")])
    journal = DurableJournal(str(tmp_path / "journal"))
    journal.set_base({n.id: n for n in (a, b, c)})
    journal.add(b"\x01", 1, 1)
    leader = SimpleNamespace(_journal=journal, raftCommitIndex=1, _learners={}, _self_node=a)

    def appends(kind: str, node) -> bool:
        return SagaLogRaft._SyncObj__doChangeCluster(leader, [kind, node.id, node])

    assert not appends(ADD, d)  # not a learner of this leader: never caught up
    leader._learners[d.id] = d
    assert appends(ADD, d)
    assert not appends(ADD, b)  # a member already
    assert not appends(REMOVE, a)  # the leader itself
    assert not appends(REMOVE, d)  # not a member
    assert appends(REMOVE, b)
    journal.add(change_command(ADD, d), 2, 1)  # appended, not committed
    assert not appends(REMOVE, b) and not appends(REMOVE, c)  # one change at a time
    leader.raftCommitIndex = 2
    assert appends(REMOVE, b)
    journal.close()


class Replicas:
    """Real SagaLogRaft replicas in this process, each on its own loopback port."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        self.nodes: dict[str, object] = {}
        self.running: dict[str, SagaLogRaft] = {}

    def start(self, name: str, node, peers: list, joining: bool = False, **kw) -> SagaLogRaft:
        raft = SagaLogRaft(
            node,
            peers,
            str(self.tmp_path / name),
            FAST,
            password="membership-test-secret",
            joining=joining,
            **kw,
        )
        self.nodes[name] = node
        self.running[name] = raft
        return raft

    def stop(self, name: str) -> None:
        self.running.pop(name).close()

    def leader(self, among: list[str] | None = None) -> SagaLogRaft:
        names_ = among or list(self.running)
        return wait_for(
            lambda: next(
                (
                    self.running[n]
                    for n in names_
                    if self.running[n].status().role == 2 and self.running[n].is_member()
                ),
                None,
            ),
            "a leader",
        )

    def close(self) -> None:
        for name in list(self.running):
            self.stop(name)


def wait_for(check: Callable, what: str, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(f"no {what} within {timeout_s}s")


@contextmanager
def replicas(tmp_path) -> Iterator[Replicas]:
    group = Replicas(tmp_path)
    try:
        yield group
    finally:
        group.close()


def commit(leader: SagaLogRaft, n: int, tag: str) -> int:
    """Commit n entries (Member records: no saga needed); the last one's index."""
    for i in range(n):
        batch = codec.encode_batch([rec.member(f"{tag}{i}", b"incarnation")])
        leader.apply_batch(batch, sync=True, timeout=WAIT_S)
    return leader.raftCommitIndex


def test_a_learner_catches_up_before_it_votes_then_a_node_is_removed(tmp_path) -> None:
    ports = free_ports(5)
    n = {f"n{i + 1}": _node(p, f"n{i + 1}") for i, p in enumerate(ports)}
    first = ["n1", "n2", "n3"]

    def start(name: str) -> SagaLogRaft:
        peers = [n[o] for o in first if o != name]
        return group.start(name, n[name], peers, compaction_min_entries=100)

    with replicas(tmp_path) as group:
        for name in first:
            start(name)
        leader = group.leader()
        commit(leader, 250, "before")  # past the snapshot threshold: n4 gets a snapshot

        n4 = group.start("n4", n["n4"], [n[o] for o in first], joining=True)
        time.sleep(0.5)  # it hears nobody: not a member, it never campaigns
        assert not n4.is_member() and n4.status().role == 0 and n4.raftCurrentTerm == 0
        leader = group.leader(first)
        with pytest.raises(MembershipRefused):  # never added before it caught up
            leader.change_membership(ADD, n["n4"], WAIT_S)
        leader.add_learner(n["n4"])
        target = leader.raftCommitIndex
        wait_for(lambda: (leader.learner_match(n["n4"].id) or 0) >= target, "learner catch-up")
        assert n4.raftLastApplied >= target - 1 and not n4.is_member()
        assert n4._journal[0][1] > 1  # it started from the leader's snapshot
        assert len(leader.members()) == 3

        # A learner counts toward no majority: the leader alone with it commits nothing.
        followers = [x for x in first if group.running[x] is not leader]
        for name in followers:
            group.stop(name)
        with pytest.raises(Exception, match="(?i)timeout"):
            leader.apply_batch(
                codec.encode_batch([rec.member("lonely", b"x")]), sync=True, timeout=1.0
            )
        for name in followers:
            start(name)
        leader = group.leader(first)
        leader.add_learner(n["n4"])  # a learner lives on the leader it was asked of
        target = leader.raftCommitIndex
        wait_for(lambda: (leader.learner_match(n["n4"].id) or 0) >= target, "learner catch-up")

        leader.change_membership(ADD, n["n4"], WAIT_S)
        for name in ["n1", "n2", "n3", "n4"]:
            raft = group.running[name]
            wait_for(lambda r=raft: len(r.members()) == 4, f"{name} seeing 4 members")
        assert n4.is_member()
        assert names(leader.members()[n["n4"].id]) == ("n4", n["n4"].grpc_addr)
        with pytest.raises(MembershipRefused):  # no second copy of a member
            leader.change_membership(ADD, n["n4"], WAIT_S)

        # Remove a follower: it leaves everyone's configuration, its own included.
        removed = next(x for x in first if group.running[x] is not leader)
        leader.change_membership(REMOVE, n[removed], WAIT_S)
        for name in group.running:
            raft = group.running[name]
            if name != removed:
                wait_for(lambda r=raft: len(r.members()) == 3, f"{name} seeing 3 members")
        group.stop(removed)
        survivors = list(group.running)

        # The three left commit, and survive their leader's loss (2 of 3).
        leader = group.leader(survivors)
        term = leader.raftCurrentTerm
        commit(leader, 20, "after")
        old_leader = next(x for x in survivors if group.running[x] is leader)
        group.stop(old_leader)
        kept = [x for x in survivors if x != old_leader]
        new_leader = group.leader(kept)
        assert new_leader.raftCurrentTerm > term
        assert len(new_leader.members()) == 3
        final = commit(new_leader, 5, "new")
        for name in kept:
            raft = group.running[name]
            wait_for(lambda r=raft: r.raftLastApplied >= final, f"{name} applying")

        # Restarted, a node takes its configuration from its log and snapshot,
        # not from its command line (n4 still says it joins n1-n3).
        if "n4" in group.running:
            group.stop("n4")
        again = group.start("n4", n["n4"], [n[o] for o in first], joining=True)
        wait_for(lambda: len(again.members()) == 3 and again.is_member(), "n4's configuration")
        assert removed not in {names(x)[0] for x in again.members().values()}
