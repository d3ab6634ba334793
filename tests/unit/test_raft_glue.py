"""The pysyncobj glue's own logic: log matching on a follower, link-fault ordering."""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace

from cluster.testkit.launcher import free_ports
from sagalog.journal import DurableJournal
from sagalog.raft import LinkFaults, RaftTiming, SagaLogRaft, align_append_entries, raft_clock


def follower(tmp_path, terms: list[int], commit: int, current_term: int = 9):
    journal = DurableJournal(str(tmp_path / "journal"))
    for idx, term in enumerate(terms, start=1):
        journal.add(b"x", idx, term)
    return SimpleNamespace(
        _journal=journal,
        raftCurrentTerm=current_term,
        raftCommitIndex=commit,
        raftLastApplied=commit,
    )


def test_a_conflicting_uncommitted_suffix_is_dropped(tmp_path) -> None:
    f = follower(tmp_path, [1, 1, 7, 7, 7], commit=2)
    SagaLogRaft._drop_conflicting_suffix(f, prev_idx=4, prev_term=9, leader_term=9)
    assert [e[1] for e in f._journal[:]] == [1, 2, 3]


def test_matching_entries_committed_entries_and_old_leaders_are_left_alone(tmp_path) -> None:
    f = follower(tmp_path, [1, 1, 7, 7, 7], commit=3)
    SagaLogRaft._drop_conflicting_suffix(f, prev_idx=4, prev_term=7, leader_term=9)  # matches
    SagaLogRaft._drop_conflicting_suffix(f, prev_idx=3, prev_term=9, leader_term=9)  # committed
    SagaLogRaft._drop_conflicting_suffix(f, prev_idx=5, prev_term=9, leader_term=8)  # old leader
    SagaLogRaft._drop_conflicting_suffix(f, prev_idx=9, prev_term=9, leader_term=9)  # beyond
    assert len(f._journal) == 5


def test_delayed_messages_keep_their_order_when_the_delay_is_lifted(tmp_path) -> None:
    path = tmp_path / "faults.json"
    peer = SimpleNamespace(address="127.0.0.1:7002")
    path.write_text(json.dumps({"delay_ms": {peer.address: 10_000}}))
    faults = LinkFaults(str(path))
    assert not faults.outgoing(peer, "first")
    path.write_text("{}")
    faults._next_check = 0.0
    os.utime(path, (1, 1))  # a different mtime: re-read
    assert not faults.outgoing(peer, "second")  # queued behind the held one
    assert faults.due() == []
    for queue in faults._held.values():  # the delay runs out
        queue[0] = (0.0, *queue[0][1:])
    assert [m for _, m in faults.due()] == ["first", "second"]
    assert faults.outgoing(peer, "third")  # nothing held any more: sent at once


# ---- AppendEntries on a follower: Raft's log-matching rule -------------------------


def held(pairs: list[tuple[int, int]]) -> list[tuple[bytes, int, int]]:
    """Journal entries (command, index, term) for (index, term) pairs."""
    return [(b"c%d" % idx, idx, term) for idx, term in pairs]


def append(prev: int, prev_term: int, pairs: list[tuple[int, int]], commit: int = 0) -> dict:
    return {
        "type": "append_entries",
        "term": 5,
        "commit_index": commit,
        "prevLogIdx": prev,
        "prevLogTerm": prev_term,
        "entries": held(pairs),
    }


def test_a_shorter_append_keeps_the_entries_after_it_and_proves_only_its_own() -> None:
    journal = held([(1, 0), (2, 2), (3, 2), (4, 2), (5, 2)])
    message = append(1, 0, [(2, 2), (3, 2)], commit=5)
    assert align_append_entries(journal, message) is None  # no deletion warranted
    assert (message["prevLogIdx"], message["prevLogTerm"], message["entries"]) == (3, 2, [])
    assert message["commit_index"] == 3  # entries 4 and 5 were not proven by this message


def test_entries_already_held_are_not_added_again() -> None:
    journal = held([(1, 0), (2, 2), (3, 2)])
    message = append(1, 0, [(2, 2), (3, 2), (4, 2), (5, 2)], commit=4)
    assert align_append_entries(journal, message) is None
    assert (message["prevLogIdx"], message["prevLogTerm"]) == (3, 2)
    assert message["entries"] == held([(4, 2), (5, 2)])
    assert message["commit_index"] == 4


def test_the_first_conflicting_entry_is_where_deletion_starts() -> None:
    journal = held([(1, 0), (2, 2), (3, 2), (4, 2), (5, 2)])
    message = append(2, 2, [(3, 2), (4, 5), (5, 5)])
    assert align_append_entries(journal, message) == 4
    assert (message["prevLogIdx"], message["prevLogTerm"]) == (3, 2)
    assert message["entries"] == held([(4, 5), (5, 5)])


def test_a_missing_or_mismatched_previous_entry_is_left_to_pysyncobj() -> None:
    journal = held([(1, 0), (2, 2), (3, 2)])
    no_prev = append(0, 0, []) | {"prevLogIdx": None, "prevLogTerm": None}
    for message in (append(4, 2, [(5, 2)]), append(3, 4, [(4, 5)]), no_prev):
        before = dict(message)
        assert align_append_entries(journal, message) is None
        assert message == before


def real_follower(tmp_path) -> SagaLogRaft:
    """A SagaLogRaft that never ticks (so never campaigns): the test hands it
    messages through the transport, as the network would."""
    own, *peers = free_ports(3)
    return SagaLogRaft(
        f"127.0.0.1:{own}",
        [f"127.0.0.1:{port}" for port in peers],
        str(tmp_path / "n1"),
        RaftTiming(),
        auto_tick=False,
    )


def test_pysyncobj_keeps_acknowledged_entries_when_a_stale_append_arrives(tmp_path) -> None:
    """The bug that diverged replicas after a whole-cluster restart: pysyncobj cut
    every entry after a stale AppendEntries' prevLogIdx, entries it had acknowledged."""
    raft = real_follower(tmp_path)
    try:
        transport = raft._SyncObj__transport
        leader = sorted(raft._SyncObj__otherNodes, key=lambda n: n.address)[0]

        def receive(message: dict) -> list[tuple[int, int]]:
            transport._onMessageReceived(leader, message)
            return [(e[1], e[2]) for e in raft._journal[:]]

        assert receive(append(1, 0, [(2, 5), (3, 5), (4, 5), (5, 5)])) == [
            (1, 0),
            (2, 5),
            (3, 5),
            (4, 5),
            (5, 5),
        ]
        # Sent before the longer one and delayed, or resent from a lower index.
        assert len(receive(append(1, 0, [(2, 5), (3, 5)], commit=5))) == 5
        assert raft.raftCommitIndex == 3  # what that message proved, not 5
        # A snapshot message proves nothing about this log's entries: no commit.
        snapshot_chunk = {"type": "append_entries", "term": 5, "commit_index": 5}
        receive(snapshot_chunk | {"serialized": None})
        assert raft.raftCommitIndex == 3
        # A real conflict still truncates: a newer leader replaced entries 4-5.
        conflict = append(3, 5, [(4, 6)]) | {"term": 6}
        assert receive(conflict) == [(1, 0), (2, 5), (3, 5), (4, 6)]
    finally:
        raft.close()


def test_a_journal_past_its_byte_bound_is_snapshotted_and_compacted(tmp_path, monkeypatch) -> None:
    """pysyncobj compacts by entry count only (50,000 here): a few large entries must
    trigger a snapshot too, or the journal grows in memory without bound."""
    import sagalog.raft.replica as raft_module

    monkeypatch.setattr(raft_module, "JOURNAL_COMPACT_BYTES", 64 * 1024)
    (own,) = free_ports(1)
    raft = SagaLogRaft(f"127.0.0.1:{own}", [], str(tmp_path / "n1"), RaftTiming(), auto_tick=False)
    try:
        deadline = time.monotonic() + 20
        while not raft._isLeader() and time.monotonic() < deadline:
            raft.doTick(0.01)
        applied: list[bytes] = []
        for _ in range(40):  # 40 x 8 KiB: five times the bound
            raft.apply_batch(b"\x00" * 8192, callback=lambda result, _err: applied.append(result))
        snapshot = tmp_path / "n1" / "snapshot"
        while time.monotonic() < deadline and (
            len(applied) < 40 or raft._journal.size_bytes >= 64 * 1024
        ):
            raft.doTick(0.01)
        assert len(applied) == 40
        assert snapshot.exists()
        assert raft._journal.size_bytes < 64 * 1024
        assert len(raft._journal) < 40
        assert raft.saga_log.applied_index() == raft.raftLastApplied
    finally:
        raft.close()


def test_the_leader_fsyncs_beside_replication_and_counts_itself_only_once_durable(
    tmp_path, monkeypatch
) -> None:
    """Raft thesis 10.2.1: the leader's AppendEntries leave before its own fsync,
    which is done before it reads any answer (so before it may count itself toward
    a commit); a follower still answers only after its own fsync."""
    from pysyncobj.transport import TCPTransport

    events: list[tuple] = []  # (what, node, ...) in the order they happened
    tcp_send = TCPTransport.send

    def recording_send(transport, node, message):
        entries = [e[1] for e in message.get("entries") or []]
        events.append(("send", transport._selfNode.address, message.get("type"), entries, message))
        return tcp_send(transport, node, message)

    monkeypatch.setattr(TCPTransport, "send", recording_send)
    ports = free_ports(3)
    addrs = [f"127.0.0.1:{port}" for port in ports]
    nodes = []
    for n, addr in enumerate(addrs):
        raft = SagaLogRaft(
            addr,
            [a for a in addrs if a != addr],
            str(tmp_path / f"n{n}"),
            RaftTiming(),
            auto_tick=False,
        )
        journal, poller = raft._journal, raft._poller
        fsync, poll, commit = journal._fsync_and_record, poller.poll, journal.setRaftCommitIndex
        journal._fsync_and_record = lambda j=journal, a=addr, f=fsync: (
            events.append(("fsync", a, j[-1][1])),
            f(),
        )[-1]
        poller.poll = lambda t, a=addr, p=poll: (events.append(("poll", a)), p(t))[-1]
        journal.setRaftCommitIndex = lambda i, a=addr, c=commit: (
            events.append(("commit", a, i)),
            c(i),
        )[-1]
        nodes.append(raft)
    try:
        deadline = time.monotonic() + 20

        def tick_until(done) -> None:
            while not done():
                assert time.monotonic() < deadline, "the in-process cluster did not get there"
                for raft in nodes:
                    raft.doTick(0.002)

        tick_until(lambda: any(r._isLeader() for r in nodes))
        leader = next(r for r in nodes if r._isLeader())
        tick_until(lambda: leader.raftCommitIndex == leader._journal[-1][1])
        index = leader._journal[-1][1] + 1
        done: list[bytes] = []
        start = len(events)
        leader.apply_batch(b"\x00" * 64, callback=lambda result, _err: done.append(result))
        tick_until(lambda: done and all(r.raftLastApplied >= index for r in nodes))
    finally:
        for raft in nodes:
            raft.close()

    seen = events[start:]
    me = leader._SyncObj__selfNode.address

    def first(match) -> int:
        return next(i for i, e in enumerate(seen) if match(e))

    sent = first(lambda e: e[:3] == ("send", me, "append_entries") and index in e[3])
    synced = first(lambda e: e[:2] == ("fsync", me) and e[2] >= index)
    assert sent < synced, "the leader's AppendEntries waited for its own fsync"
    assert not any(e == ("poll", me) for e in seen[sent:synced]), (
        "the leader read answers before its fsync was done"
    )
    assert synced < first(lambda e: e[:2] == ("commit", me) and e[2] >= index)
    for follower in (a for a in addrs if a != me):
        answered = first(
            lambda e, f=follower: (
                e[:3] == ("send", f, "next_node_idx") and e[4]["next_node_idx"] > index
            )
        )
        assert first(lambda e, f=follower: e[:2] == ("fsync", f) and e[2] >= index) < answered


def test_a_follower_reads_a_waiting_vote_request_before_its_own_timer_makes_it_campaign(
    tmp_path,
) -> None:
    """Two followers left after the leader died: one campaigns while the other's loop
    is held up past its own timeout. The late one must vote for the candidate whose
    request already waits on its socket, not campaign too (a split vote costs the
    cluster another election timeout)."""
    ports = free_ports(3)
    addrs = [f"127.0.0.1:{port}" for port in ports]
    nodes = [
        SagaLogRaft(
            addr,
            [a for a in addrs if a != addr],
            str(tmp_path / f"n{n}"),
            # A peer that does not tick for a second would otherwise have its link
            # closed (pysyncobj's read timeout) and the vote request dropped with it.
            RaftTiming(connection_timeout_ms=60_000),
            auto_tick=False,
        )
        for n, addr in enumerate(addrs)
    ]
    deadline = time.monotonic() + 20

    def tick(rafts, until) -> None:
        while not until():
            assert time.monotonic() < deadline, "the in-process cluster did not get there"
            for raft in rafts:
                raft.doTick(0.002)

    try:
        tick(nodes, lambda: any(r._isLeader() for r in nodes))
        leader = next(r for r in nodes if r._isLeader())
        early, late = [r for r in nodes if r is not leader]
        tick(nodes, lambda: early._getLeader() is not None and late._getLeader() is not None)
        # The leader stops (no more ticks); only `early` runs until it campaigns.
        tick([early], lambda: early._SyncObj__raftState == 1)
        while raft_clock() <= late._SyncObj__raftElectionDeadline + 0.05:
            time.sleep(0.01)  # `late` is held up past its own timeout meanwhile
        late.doTick(0)
        candidate = early._SyncObj__selfNode.id
        assert late._SyncObj__raftState == 0, "the late follower campaigned too"
        assert late._SyncObj__votedForNodeId == candidate
        assert late.raftCurrentTerm == early.raftCurrentTerm
    finally:
        for raft in nodes:
            raft.close()
