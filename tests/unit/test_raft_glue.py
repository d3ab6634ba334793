"""The pysyncobj glue's own logic: log matching on a follower, link-fault ordering."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from sagalog.journal import DurableJournal
from sagalog.raft import LinkFaults, SagaLogRaft


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
