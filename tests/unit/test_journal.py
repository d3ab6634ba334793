"""DurableJournal: framing, recovery, durability points, and use by a real SyncObj."""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pysyncobj.syncobj
import pytest
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.journal import FileJournal

import sagalog.journal as journal_mod
from sagalog.journal import (
    ENTRY_HEADER_SIZE,
    FILE_HEADER_SIZE,
    DurableJournal,
    JournalCorrupt,
)


def entry(i: int, term: int = 1) -> tuple[bytes, int, int]:
    return (b"cmd-%d" % i, i, term)


def frame_size(command: bytes) -> int:
    return ENTRY_HEADER_SIZE + len(command)


@pytest.fixture
def path(tmp_path: Path) -> str:
    return str(tmp_path / "raft.journal")


@pytest.fixture
def opened() -> Iterator[list[DurableJournal]]:
    """Journals to close at the end of a test, whatever happened."""
    journals: list[DurableJournal] = []
    yield journals
    for j in journals:
        j.close()


def open_journal(path: str, opened: list[DurableJournal]) -> DurableJournal:
    j = DurableJournal(path)
    opened.append(j)
    return j


def filled(path: str, opened: list[DurableJournal], n: int) -> DurableJournal:
    j = open_journal(path, opened)
    for i in range(1, n + 1):
        j.add(*entry(i))
    return j


def read_synced_sidecar(path: str) -> int:
    with open(path + ".synced", "rb") as f:
        return int(struct.unpack(">Q", f.read(8))[0])


# ---- round trips ------------------------------------------------------------------------


def test_add_and_reopen_round_trip(path: str, opened: list[DurableJournal]) -> None:
    j = open_journal(path, opened)
    assert len(j) == 0
    j.add(b"one", 1, 1)
    j.add("two", 2, 1)  # str commands are stored and returned as bytes
    j.add(b"", 3, 2)
    expected = [(b"one", 1, 1), (b"two", 2, 1), (b"", 3, 2)]
    assert j[:] == expected
    j._destroy()

    j2 = open_journal(path, opened)
    assert j2[:] == expected
    assert j2.cut_bytes == 0
    assert os.path.getsize(path) == FILE_HEADER_SIZE + sum(frame_size(c) for c, _, _ in expected)


def test_indexing_and_slicing_like_a_list(path: str, opened: list[DurableJournal]) -> None:
    j = filled(path, opened, 5)
    entries = [entry(i) for i in range(1, 6)]
    assert j[0] == entries[0]
    assert j[-1] == entries[-1]
    assert j[1:3] == entries[1:3]
    assert j[2:] == entries[2:]
    assert j[3 : 3 + 10] == entries[3:]
    assert j[10:] == []
    with pytest.raises(IndexError):
        j[5]


def test_add_rejects_an_index_gap(path: str, opened: list[DurableJournal]) -> None:
    j = filled(path, opened, 2)
    with pytest.raises(ValueError):
        j.add(b"x", 4, 1)
    assert len(j) == 2


def test_entries_after_sync_survive_reopen_without_destroy(
    path: str, opened: list[DurableJournal]
) -> None:
    j = filled(path, opened, 3)
    j.sync()
    assert j.synced_length == os.path.getsize(path)
    j.close()  # no sync on close: like kill -9
    assert open_journal(path, opened)[:] == [entry(i) for i in range(1, 4)]


def test_unsynced_entries_survive_kill_9(path: str, opened: list[DurableJournal]) -> None:
    # add() writes through to the page cache, which outlives the process.
    filled(path, opened, 3).close()
    assert len(open_journal(path, opened)) == 3


# ---- torn tails -------------------------------------------------------------------------


def test_garbage_appended_is_cut(path: str, opened: list[DurableJournal]) -> None:
    filled(path, opened, 3).close()
    good = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(b"\xde\xad\xbe\xef" * 7)
    j = open_journal(path, opened)
    assert j.cut_bytes == 28
    assert j[:] == [entry(i) for i in range(1, 4)]
    assert os.path.getsize(path) == good
    assert j.synced_length == good
    # The cut is final: appending continues from the good end.
    j.add(*entry(4))
    j.close()
    assert open_journal(path, opened)[:] == [entry(i) for i in range(1, 5)]


@pytest.mark.parametrize("keep", [3, ENTRY_HEADER_SIZE, ENTRY_HEADER_SIZE + 2])
def test_entry_cut_mid_way_is_dropped(
    path: str, opened: list[DurableJournal], keep: int, caplog: pytest.LogCaptureFixture
) -> None:
    filled(path, opened, 3).close()
    size = os.path.getsize(path)
    last = frame_size(entry(3)[0])
    os.truncate(path, size - last + keep)
    j = open_journal(path, opened)
    assert j.cut_bytes == keep
    assert j[:] == [entry(1), entry(2)]
    assert os.path.getsize(path) == size - last
    assert f"cut {keep} bytes" in caplog.text


def test_flipped_payload_byte_fails_the_crc(path: str, opened: list[DurableJournal]) -> None:
    filled(path, opened, 3).close()
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 1)
        last = f.read(1)
        f.seek(size - 1)
        f.write(bytes([last[0] ^ 0x01]))
    j = open_journal(path, opened)
    assert j.cut_bytes == frame_size(entry(3)[0])
    assert j[:] == [entry(1), entry(2)]


def test_a_bad_entry_followed_by_a_valid_one_is_corruption_not_a_torn_tail(
    path: str, opened: list[DurableJournal]
) -> None:
    filled(path, opened, 3).close()  # never synced: a cut would be allowed by the sidecar
    second = FILE_HEADER_SIZE + frame_size(entry(1)[0])
    with open(path, "r+b") as f:
        f.seek(second + 8 + 8 + 7)  # low byte of the term of entry 2
        f.write(b"\x07")
    before = open(path, "rb").read()
    with pytest.raises(JournalCorrupt, match="a valid entry \\(index 3\\) follows"):
        DurableJournal(path)
    assert open(path, "rb").read() == before  # nothing cut


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_bad_entry_inside_the_synced_bytes_is_corruption(
    path: str, opened: list[DurableJournal], damage: str
) -> None:
    j = filled(path, opened, 3)
    j.sync()
    j.close()
    size = os.path.getsize(path)
    assert read_synced_sidecar(path) == size
    if damage == "flip":
        with open(path, "r+b") as f:
            f.seek(size - 1)
            last = f.read(1)
            f.seek(size - 1)
            f.write(bytes([last[0] ^ 0x01]))
    else:
        os.truncate(path, size - 3)  # fsynced bytes cannot tear: the file was damaged
    with pytest.raises(JournalCorrupt, match="inside the .* bytes the last fsync covered"):
        DurableJournal(path)


def test_a_torn_tail_after_the_synced_bytes_is_still_cut(
    path: str, opened: list[DurableJournal]
) -> None:
    j = filled(path, opened, 3)
    j.sync()
    j.close()
    synced = os.path.getsize(path)
    with open(path, "ab") as f:  # what the fault harness writes for a power loss
        f.write((1 << 16).to_bytes(4, "big") + os.urandom(100))
    j2 = open_journal(path, opened)
    assert j2[:] == [entry(i) for i in range(1, 4)]
    assert os.path.getsize(path) == synced


def test_index_gap_ends_the_valid_prefix(path: str, opened: list[DurableJournal]) -> None:
    filled(path, opened, 2).close()
    stray = journal_mod._frame(b"stray", 4, 1)  # a well-formed entry, but idx 3 is missing
    with open(path, "ab") as f:
        f.write(stray)
    j = open_journal(path, opened)
    assert j.cut_bytes == len(stray)
    assert j[:] == [entry(1), entry(2)]


def test_cut_back_to_synced_sidecar_keeps_synced_entries(
    path: str, opened: list[DurableJournal]
) -> None:
    j = filled(path, opened, 3)
    j.sync()
    synced = j.synced_length
    for i in range(4, 7):
        j.add(*entry(i))
    assert os.path.getsize(path) > synced
    assert read_synced_sidecar(path) == synced
    j.close()
    # Power loss: everything after the last fsync is gone.
    os.truncate(path, read_synced_sidecar(path))
    j2 = open_journal(path, opened)
    assert j2.cut_bytes == 0
    assert j2[:] == [entry(i) for i in range(1, 4)]


def test_sidecar_tracks_truncations_and_rewrites(path: str, opened: list[DurableJournal]) -> None:
    j = filled(path, opened, 6)
    j.sync()
    j.deleteEntriesFrom(4)
    assert read_synced_sidecar(path) == os.path.getsize(path) == j.synced_length
    j.deleteEntriesTo(2)
    assert read_synced_sidecar(path) == os.path.getsize(path) == j.synced_length
    j.clear()
    assert read_synced_sidecar(path) == os.path.getsize(path) == FILE_HEADER_SIZE


def test_sync_is_a_no_op_when_nothing_changed(
    path: str, opened: list[DurableJournal], monkeypatch: pytest.MonkeyPatch
) -> None:
    j = open_journal(path, opened)
    calls: list[int] = []
    real = journal_mod._datasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(journal_mod, "_datasync", counting)
    j.sync()
    assert calls == []
    j.add(*entry(1))
    j.sync()
    j.sync()
    assert len(calls) == 1


def test_reopen_syncs_what_the_previous_process_left_unsynced(
    path: str, opened: list[DurableJournal]
) -> None:
    filled(path, opened, 2).close()
    j = open_journal(path, opened)
    assert j.synced_length == os.path.getsize(path) == read_synced_sidecar(path)


# ---- deletions --------------------------------------------------------------------------


def test_delete_entries_from_persists(path: str, opened: list[DurableJournal]) -> None:
    j = filled(path, opened, 5)
    j.deleteEntriesFrom(2)
    assert j[:] == [entry(1), entry(2)]
    j.add(b"new", 3, 2)
    j.deleteEntriesFrom(10)  # past the end: nothing to do
    j.close()
    j2 = open_journal(path, opened)
    assert j2[:] == [entry(1), entry(2), (b"new", 3, 2)]
    assert j2.cut_bytes == 0


def test_delete_entries_from_is_durable_at_once(path: str, opened: list[DurableJournal]) -> None:
    j = filled(path, opened, 5)
    j.sync()
    j.deleteEntriesFrom(3)
    j.close()
    # Even cut back to the last fsync, the deleted entries stay deleted.
    os.truncate(path, read_synced_sidecar(path))
    assert len(open_journal(path, opened)) == 3


def test_delete_entries_to_persists(path: str, opened: list[DurableJournal]) -> None:
    j = filled(path, opened, 5)
    j.deleteEntriesTo(3)
    assert j[:] == [entry(4), entry(5)]
    j.add(*entry(6))  # appends after a rewrite land at the right offset
    j.deleteEntriesFrom(2)
    j.add(*entry(6, term=2))
    j.close()
    assert open_journal(path, opened)[:] == [entry(4), entry(5), entry(6, term=2)]
    assert not os.path.exists(path + ".tmp")


def test_clear_persists(path: str, opened: list[DurableJournal]) -> None:
    j = filled(path, opened, 5)
    j.clear()
    assert len(j) == 0
    j.add(*entry(40))
    j.add(*entry(41))
    j.close()
    assert open_journal(path, opened)[:] == [entry(40), entry(41)]


# ---- metadata ---------------------------------------------------------------------------


def test_term_and_vote_persist(path: str, opened: list[DurableJournal]) -> None:
    j = open_journal(path, opened)
    assert (j.getCurrentTerm(), j.getVotedForNodeId(), j.getRaftCommitIndex()) == (0, None, 1)
    j.setCurrentTerm(7, "10.0.0.1:4321")
    j.close()  # durable without any timer or destroy
    j2 = open_journal(path, opened)
    assert (j2.getCurrentTerm(), j2.getVotedForNodeId()) == (7, "10.0.0.1:4321")
    j2.setCurrentTerm(8, None)
    j2.close()
    assert open_journal(path, opened).getVotedForNodeId() is None


def test_commit_index_is_stored_lazily(path: str, opened: list[DurableJournal]) -> None:
    j = filled(path, opened, 5)
    j.setRaftCommitIndex(3)
    assert j.getRaftCommitIndex() == 3
    j.close()
    assert open_journal(path, opened).getRaftCommitIndex() == 1  # not stored yet

    j = open_journal(path, opened)
    j.setRaftCommitIndex(3)
    j.onOneSecondTimer()
    j.close()
    assert open_journal(path, opened).getRaftCommitIndex() == 3

    j = open_journal(path, opened)
    j.setRaftCommitIndex(4)
    j._destroy()
    assert open_journal(path, opened).getRaftCommitIndex() == 4


def test_commit_index_past_the_log_is_lowered(path: str, opened: list[DurableJournal]) -> None:
    j = filled(path, opened, 5)
    j.setRaftCommitIndex(5)
    j._destroy()
    # A power loss that left an older sync length in the sidecar (it is not fsynced)
    # and entry 5 torn.
    with open(path + ".synced", "r+b") as f:
        f.write(struct.pack(">Q", FILE_HEADER_SIZE))
    os.truncate(path, os.path.getsize(path) - 3)
    assert open_journal(path, opened).getRaftCommitIndex() == 4


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2]", b'{"currentTerm": "3"}', b'{"votedForNodeId": 5}'],
)
def test_corrupt_meta_raises(path: str, opened: list[DurableJournal], content: bytes) -> None:
    j = open_journal(path, opened)
    j.setCurrentTerm(3, "a:1")
    j.close()
    with open(path + ".meta", "wb") as f:
        f.write(content)
    with pytest.raises(JournalCorrupt):
        DurableJournal(path)


def test_meta_is_json(path: str, opened: list[DurableJournal]) -> None:
    open_journal(path, opened).setCurrentTerm(2, "n:1")
    with open(path + ".meta", "rb") as f:
        assert json.loads(f.read())["votedForNodeId"] == "n:1"


def test_foreign_file_is_not_truncated(path: str) -> None:
    fj = FileJournal(path)  # pysyncobj's own format
    fj.add(b"x", 1, 1)
    fj._destroy()
    size = os.path.getsize(path)
    with pytest.raises(JournalCorrupt):
        DurableJournal(path)
    assert os.path.getsize(path) == size


# ---- align_to_snapshot ------------------------------------------------------------------


def test_align_to_snapshot_found(path: str, opened: list[DurableJournal]) -> None:
    j = filled(path, opened, 8)
    assert j.align_to_snapshot(entry(4), (entry(5)[0].decode(), 5, 1))
    assert j[:] == [entry(i) for i in range(4, 9)]
    assert j.align_to_snapshot(entry(4), entry(5))  # already aligned: nothing to drop
    j.close()
    assert open_journal(path, opened)[:] == [entry(i) for i in range(4, 9)]


@pytest.mark.parametrize(
    "prev, last",
    [
        (entry(4, term=2), entry(5)),  # term differs
        (entry(4), (b"other", 5, 1)),  # command differs
        (entry(4), entry(6)),  # not adjacent
        (entry(8), entry(9)),  # last one is beyond the journal
        (entry(20), entry(21)),  # beyond the journal
        (entry(0), entry(1)),  # before the journal
    ],
)
def test_align_to_snapshot_not_found(
    path: str, opened: list[DurableJournal], prev: Any, last: Any
) -> None:
    j = filled(path, opened, 8)
    assert not j.align_to_snapshot(prev, last)
    assert len(j) == 8


def test_align_to_snapshot_on_empty_journal(path: str, opened: list[DurableJournal]) -> None:
    assert not open_journal(path, opened).align_to_snapshot(entry(1), entry(2))


# ---- a real SyncObj ---------------------------------------------------------------------


class Counter(SyncObj):
    def __init__(self, addr: str, conf: SyncObjConf) -> None:
        super().__init__(addr, [], conf)
        self.value = 0

    @replicated
    def incr(self, n: int) -> int:
        self.value += n
        return self.value


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tick_until(obj: Counter, cond: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        obj.doTick(0.005)


def test_syncobj_commits_and_replays_through_durable_journal(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    created: list[DurableJournal] = []

    def create_journal(journal_file: str | None = None) -> DurableJournal:
        assert journal_file == path
        j = DurableJournal(journal_file)
        created.append(j)
        return j

    monkeypatch.setattr(pysyncobj.syncobj, "createJournal", create_journal)
    conf = SyncObjConf(
        autoTick=False,
        journalFile=path,
        appendEntriesUseBatch=False,
        appendEntriesPeriod=0.01,
        raftMinTimeout=0.05,
        raftMaxTimeout=0.1,
    )
    addr = f"127.0.0.1:{free_port()}"
    results: list[Any] = []

    obj = Counter(addr, conf)
    try:
        tick_until(obj, obj._isLeader)
        for n in range(1, 6):
            obj.incr(n, callback=lambda res, err: results.append((res, err)))
        tick_until(obj, lambda: len(results) == 5)
        assert obj.value == 15
        assert [r for r, _ in results] == [1, 3, 6, 10, 15]
        journal = created[0]
        # Initial no-op, the leader's no-op, five commands.
        assert len(journal) == 7
        assert [e[1] for e in journal[:]] == list(range(1, 8))
        assert all(isinstance(e[0], bytes) for e in journal[:])
        assert journal.getCurrentTerm() >= 1
        assert journal.getVotedForNodeId() == addr
    finally:
        obj.destroy()

    obj2 = Counter(addr, conf)
    try:
        journal2 = created[1]
        assert journal2.cut_bytes == 0
        assert len(journal2) == 7
        # The stored commit index lets the replay start before any election.
        assert journal2.getRaftCommitIndex() == 7
        tick_until(obj2, lambda: obj2.value == 15)
        tick_until(obj2, obj2._isLeader)
        done: list[Any] = []
        obj2.incr(1, callback=lambda res, err: done.append(res))
        tick_until(obj2, lambda: done == [16])
        assert journal2.getCurrentTerm() > journal.getCurrentTerm()
    finally:
        obj2.destroy()


def test_bytes_through_counts_what_compaction_up_to_an_index_frees(
    path: str, opened: list[DurableJournal]
) -> None:
    j = open_journal(path, opened)
    assert j.bytes_through(5) == 0
    for idx in range(1, 4):
        j.add(b"x" * 10, idx, 1)
    frame = ENTRY_HEADER_SIZE + 10
    assert [j.bytes_through(i) for i in (0, 1, 2, 3, 9)] == [
        0,
        frame,
        2 * frame,
        3 * frame,
        3 * frame,
    ]
    assert j.size_bytes == FILE_HEADER_SIZE + 3 * frame


@pytest.mark.parametrize("shrink", ["compaction", "truncation"])
def test_a_torn_tail_after_the_file_shrank_is_still_a_torn_tail(
    path: str, opened: list[DurableJournal], shrink: str, monkeypatch
) -> None:
    """A power loss right after the journal shrank and grew again. The sidecar's
    unsynced writes are lost with it; if it still held the old, larger length, the
    torn tail would look like damage inside fsynced bytes and stop the node."""
    j = filled(path, opened, 20)
    j.sync()
    durable = {"synced": read_synced_sidecar(path)}  # written back by the OS since

    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # what reaches the disk of the sidecar: its fsyncs
        real_fsync(fd)
        if fd == j._synced_fd:
            durable["synced"] = read_synced_sidecar(path)

    monkeypatch.setattr(os, "fsync", fsync)
    if shrink == "compaction":
        j.deleteEntriesTo(18)  # rewrites the file with entries 19 and 20
    else:
        j.deleteEntriesFrom(2)  # keeps entries 1 and 2
    kept = j[:]
    j.close()
    monkeypatch.setattr(os, "fsync", real_fsync)
    with open(path + ".synced", "r+b") as f:  # the power loss: only fsynced bytes stay
        f.write(struct.pack(">Q", durable["synced"]))
    with open(path, "ab") as f:  # appended after the shrink, never synced, torn
        f.write((1 << 16).to_bytes(4, "big") + os.urandom(60))
    assert open_journal(path, opened)[:] == kept
