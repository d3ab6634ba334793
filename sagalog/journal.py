"""DurableJournal: a crash-safe Raft journal for pysyncobj.

pysyncobj's FileJournal writes entries through an mmap and never fsyncs, so a
follower may acknowledge an entry that a power loss then erases, and a torn
write is read back as garbage. Raft's safety argument needs the opposite: an
entry a node has acknowledged, and the term and vote it has granted, must
survive a crash.

This journal keeps the entries in memory (pysyncobj reads and slices the log
constantly) and mirrors them into one append-only file:

    file header   >8sII   magic b"SAGAJRNL", format version, reserved (0)
    entry         >IIQQ   payload length, crc32(idx, term, payload), idx, term
                  payload the command bytes

`add` only writes (the bytes reach the page cache and survive kill -9);
`sync` makes them durable. The node calls `sync` before sending any Raft
message, so an acknowledgement never leaves before the entries it covers are
on disk. Recovery keeps the longest valid prefix (whole entries, matching
crc, consecutive indexes) and cuts the rest: a torn tail is never applied.
Only a tail can be torn, though: a bad entry followed by a valid one, or a bad
entry inside what the last fsync covered, is corruption, and cutting there would
silently drop acknowledged entries. Recovery then raises JournalCorrupt (the
node stops and says so) and leaves the file as it is.

It also tracks the Raft configuration its entries imply (`members`): the
membership changes among its entries, applied to `base`, the configuration as of
its first entry (see sagalog.membership). Compaction folds the changes it
drops into `base`; the replica sets `base` from its command line or its snapshot.

Term, vote and commit index live in `<path>.meta` (JSON, replaced atomically).
`<path>.synced` holds the byte length of the last fsync: cutting the journal back
to it simulates a power loss, and recovery treats a bad entry before it as
corruption. It is not fsynced when it grows (it is written after the fsync it
records, so a power loss leaves an older, smaller value: recovery is then only
more lenient), and it is fsynced before the file shrinks (compaction, a
follower's truncation), so it never stays larger than the file's fsynced bytes.

Not thread-safe: pysyncobj calls the journal from its tick thread only, and
`sync` must be called from that thread too.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, overload

from pysyncobj.journal import Journal
from pysyncobj.pickle import to_bytes

from sagalog.fsync import fsync_dir, pwrite_all, replace_durably
from sagalog.membership import ADD, MEMBERSHIP, Change, change_in, fold

logger = logging.getLogger(__name__)

MAGIC = b"SAGAJRNL"
FORMAT_VERSION = 1

_FILE_HEADER = struct.Struct(">8sII")  # magic, format version, reserved
_ENTRY_HEADER = struct.Struct(">IIQQ")  # payload length, crc32, idx, term
# The largest entry the node writes (one batch, codec.MAX_BATCH_BYTES) with room to
# spare: how far past a damaged entry recovery looks for a valid one.
MAX_ENTRY_BYTES = 9 * 1024 * 1024
_IDX_TERM = struct.Struct(">QQ")
_SYNCED = struct.Struct(">Q")

FILE_HEADER_SIZE = _FILE_HEADER.size
ENTRY_HEADER_SIZE = _ENTRY_HEADER.size

# fdatasync also flushes the file size, which is all an append or a truncate changes.
_datasync = getattr(os, "fdatasync", os.fsync)

Entry = tuple[bytes, int, int]
_MEMBERSHIP_BYTE = bytes([MEMBERSHIP])


def _change(command: bytes) -> Change | None:
    """The membership change an entry holds; None for others, and for one that
    cannot be read (logged: it changes nothing)."""
    try:
        return change_in(command)
    except Exception:  # a malformed change entry must not stop the journal
        logger.exception("unreadable membership entry %.40r", command)
        return None


class JournalCorrupt(Exception):
    """The journal or its metadata exists but cannot be trusted.

    Raised instead of falling back to defaults: forgetting a granted vote or
    a term would let this node vote twice in one term.
    """


EXIT_STORAGE_FAILURE = 74  # EX_IOERR, as sagalog.raft.fail_stop

_F = TypeVar("_F", bound=Callable[..., Any])


def _stop_on_io_error(method: _F) -> _F:
    """A journal write that fails must stop the node, not be retried: after a failed
    fsync the kernel may drop the dirty pages, so a later fsync that "succeeds"
    would let the node acknowledge entries that are not on disk; a vote that failed
    to persist would be forgotten by a restart. (pysyncobj logs exceptions raised
    in its tick and carries on.)"""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except OSError as exc:
            logger.critical("FAIL-STOP: journal %s failed: %s", method.__name__, exc)
            logging.shutdown()
            os._exit(EXIT_STORAGE_FAILURE)

    return wrapper  # type: ignore[return-value]


def _entry_crc(idx: int, term: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(_IDX_TERM.pack(idx, term)))


def _frame(command: bytes, idx: int, term: int) -> bytes:
    crc = _entry_crc(idx, term, command)
    return _ENTRY_HEADER.pack(len(command), crc, idx, term) + command


def _file_header() -> bytes:
    return _FILE_HEADER.pack(MAGIC, FORMAT_VERSION, 0)


class DurableJournal(Journal):
    """A pysyncobj journal whose acknowledged state survives crashes and power loss."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.meta_path = path + ".meta"
        self.synced_path = path + ".synced"
        self._entries: list[Entry] = []
        self._offsets: list[int] = []  # file offset of each entry's header
        self._end = FILE_HEADER_SIZE  # file length: end of the last entry
        self._synced = 0  # file length at the last fsync
        self._dirty = False  # bytes written since the last fsync
        self._closed = False
        #: Bytes cut from the end of the file at open (torn or corrupt tail).
        self.cut_bytes = 0
        #: The configuration as of the first entry (Raft address -> node).
        self.base: dict[str, Any] = {}
        self._changes: list[tuple[int, Change]] = []  # (index, change) of each in the log
        #: Moves whenever `members()` may answer differently.
        self.members_version = 0

        meta = self._load_meta()
        self._term: int = meta.get("currentTerm", 0)
        self._vote: str | None = meta.get("votedForNodeId")
        self._commit_index: int | None = meta.get("raftCommitIndex")
        self._meta_dirty = False

        if not os.path.exists(path) or os.path.getsize(path) == 0:
            # Created atomically, so a file without a valid header is never ours.
            replace_durably(path, path + ".tmp", [_file_header()])
        self._fd = os.open(path, os.O_RDWR)
        self._synced_fd = -1
        try:
            self._recover()
            self._synced_fd = os.open(self.synced_path, os.O_RDWR | os.O_CREAT, 0o644)
            # The previous process may have died before syncing what it wrote: those
            # bytes are only in the page cache. Sync them now, before this node can
            # acknowledge anything based on them.
            self._fsync_and_record()
        except BaseException:
            self.close()
            raise

        self._changes = [(idx, c) for cmd, idx, _ in self._entries if (c := _change(cmd))]
        if self._commit_index is not None and self._entries:
            last_idx = self._entries[-1][1]
            if self._commit_index > last_idx:
                # Only after a cut tail: a commit index past the log would let a
                # leader treat new, uncommitted entries as committed.
                logger.warning(
                    "journal %s: stored commit index %d is past the last entry %d; lowered",
                    path,
                    self._commit_index,
                    last_idx,
                )
                self._commit_index = last_idx
                self._meta_dirty = True

    # ---- the configuration ------------------------------------------------------------

    def members(self) -> dict[str, Any]:
        """The latest configuration in the log, committed or not."""
        return fold(self.base, (c for _, c in self._changes))

    def set_base(self, base: dict[str, Any]) -> None:
        self.base = dict(base)
        self.members_version += 1

    def changes_after(self, idx: int) -> list[tuple[int, Change]]:
        """The membership changes at indexes above `idx`, in log order."""
        return [(i, c) for i, c in self._changes if i > idx]

    def members_through(self, idx: int) -> dict[str, Any]:
        """The configuration as of entry `idx` (what a snapshot there records).

        Worked back from the latest one, not forward from `base`: a joining node's
        base is the configuration when it joined, which already holds changes its
        log has at later indexes. Each change flips one node (the leader appends
        an add only for a node out, a removal only for one in), so a node's state
        at `idx` is the opposite of what the first change after `idx` made it."""
        members = self.members()
        seen: set[str] = set()
        for i, (kind, node) in self._changes:
            if i <= idx or node.id in seen:
                continue
            seen.add(node.id)
            if kind == ADD:
                members.pop(node.id, None)
            else:
                members[node.id] = node
        return members

    def _forget_changes_from(self, idx: int) -> None:
        kept = [(i, c) for i, c in self._changes if i < idx]
        if len(kept) != len(self._changes):
            self._changes = kept
            self.members_version += 1

    def _fold_changes_before(self, idx: int) -> None:
        """Compaction drops the entries before `idx`: their changes move into `base`."""
        folded = [c for i, c in self._changes if i < idx]
        if folded:
            self.base = fold(self.base, folded)
            self._changes = [(i, c) for i, c in self._changes if i >= idx]
            self.members_version += 1

    # ---- open and recovery ------------------------------------------------------------

    def _load_meta(self) -> dict[str, Any]:
        """Read `<path>.meta`. Missing -> defaults; present but unusable -> JournalCorrupt."""
        try:
            with open(self.meta_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise JournalCorrupt(f"cannot read {self.meta_path}: {exc}") from exc
        try:
            meta = json.loads(raw)
        except ValueError as exc:
            raise JournalCorrupt(f"cannot parse {self.meta_path}: {exc}") from exc
        if not isinstance(meta, dict):
            raise JournalCorrupt(f"{self.meta_path}: expected a JSON object")
        term = meta.get("currentTerm", 0)
        vote = meta.get("votedForNodeId")
        commit = meta.get("raftCommitIndex")
        if (
            not isinstance(term, int)
            or isinstance(term, bool)
            or term < 0
            or not (vote is None or isinstance(vote, str))
            or not (commit is None or (isinstance(commit, int) and not isinstance(commit, bool)))
        ):
            raise JournalCorrupt(f"{self.meta_path}: bad field types: {meta!r}")
        return meta

    def _recover(self) -> None:
        """Load the longest valid prefix of entries and cut the file after it."""
        size = os.fstat(self._fd).st_size
        data = os.pread(self._fd, size, 0) if size else b""
        while len(data) < size:  # pread may return less than asked
            chunk = os.pread(self._fd, size - len(data), len(data))
            if not chunk:
                break
            data += chunk
        size = len(data)
        if size < FILE_HEADER_SIZE:
            raise JournalCorrupt(f"{self.path}: file header is truncated ({size} bytes)")
        magic, version, _ = _FILE_HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise JournalCorrupt(f"{self.path}: not a DurableJournal file (magic {magic!r})")
        if version != FORMAT_VERSION:
            raise JournalCorrupt(f"{self.path}: unsupported format version {version}")

        synced = self._recorded_sync_length()
        pos = FILE_HEADER_SIZE
        reason = ""
        while pos < size:
            if size - pos < ENTRY_HEADER_SIZE:
                reason = "torn entry header"
                break
            length, crc, idx, term = _ENTRY_HEADER.unpack_from(data, pos)
            start = pos + ENTRY_HEADER_SIZE
            end = start + length
            if end > size:
                reason = "torn entry payload"
                break
            payload = data[start:end]
            if _entry_crc(idx, term, payload) != crc:
                reason = "crc mismatch"
                break
            if self._entries and idx != self._entries[-1][1] + 1:
                reason = f"index gap ({self._entries[-1][1]} then {idx})"
                break
            self._entries.append((payload, idx, term))
            self._offsets.append(pos)
            pos = end
        if reason:
            self._refuse_a_cut_that_is_not_a_torn_tail(data, pos, synced, reason)
        self._end = pos
        self.cut_bytes = size - pos
        if self.cut_bytes:
            logger.warning(
                "journal %s: cut %d bytes after the last good entry at offset %d (%s); "
                "%d entries kept",
                self.path,
                self.cut_bytes,
                pos,
                reason,
                len(self._entries),
            )
            os.ftruncate(self._fd, pos)
            # The caller fsyncs right after: the cut is durable before anything is appended.
            self._dirty = True

    def _recorded_sync_length(self) -> int:
        """What `<path>.synced` says the last fsync covered (0 when absent)."""
        try:
            with open(self.synced_path, "rb") as f:
                raw = f.read(_SYNCED.size)
        except FileNotFoundError:
            return 0
        return int(_SYNCED.unpack(raw)[0]) if len(raw) == _SYNCED.size else 0

    def _refuse_a_cut_that_is_not_a_torn_tail(
        self, data: bytes, pos: int, synced: int, reason: str
    ) -> None:
        """A bad entry at `pos` may be cut only if it is a torn tail: written after
        the last fsync, with nothing valid after it."""
        if pos < synced:
            raise JournalCorrupt(
                f"{self.path}: {reason} at offset {pos}, inside the {synced} bytes the last "
                "fsync covered: the disk or the file is damaged, not torn by a crash. "
                "Cutting here would drop acknowledged entries; the node stops instead. "
                "Restore the data directory from a replica (see README, re-adding a node)."
            )
        after = self._valid_entry_after(data, pos)
        if after is not None:
            raise JournalCorrupt(
                f"{self.path}: {reason} at offset {pos}, but a valid entry (index "
                f"{after[1]}) follows at offset {after[0]}: the journal is damaged in the "
                "middle, not torn at its end. Cutting here would drop acknowledged "
                "entries; the node stops instead."
            )

    def _valid_entry_after(self, data: bytes, pos: int) -> tuple[int, int] | None:
        """(offset, index) of a well-formed entry starting after `pos`, if any, within
        reach of one largest entry: where the entry after a damaged one would be."""
        next_idx = {self._entries[-1][1] + 1, self._entries[-1][1] + 2} if self._entries else None
        end = min(len(data) - ENTRY_HEADER_SIZE, pos + MAX_ENTRY_BYTES + ENTRY_HEADER_SIZE)
        for at in range(pos + 1, end + 1):
            length, crc, idx, term = _ENTRY_HEADER.unpack_from(data, at)
            if next_idx is not None and idx not in next_idx:
                continue
            start = at + ENTRY_HEADER_SIZE
            if start + length > len(data):
                continue
            if _entry_crc(idx, term, data[start : start + length]) == crc:
                return at, idx
        return None

    # ---- durability -------------------------------------------------------------------

    def _lower_recorded_sync(self, length: int) -> None:
        """Before the file shrinks, make `<path>.synced` durably no larger than its new
        length. Otherwise a power loss could leave the old, larger value beside the
        shorter file, and a torn tail appended since would look like damage inside
        fsynced bytes (recovery would stop the node instead of cutting it)."""
        if length < self._synced:
            self._synced = length
            os.pwrite(self._synced_fd, _SYNCED.pack(length), 0)
            os.fsync(self._synced_fd)

    def _fsync_and_record(self) -> None:
        _datasync(self._fd)
        self._dirty = False
        self._synced = self._end
        # Deliberately not fsynced: it only has to survive kill -9, as a test aid.
        os.pwrite(self._synced_fd, _SYNCED.pack(self._synced), 0)

    @_stop_on_io_error
    def sync(self) -> None:
        """Make every entry added so far durable. A cheap no-op when nothing changed.

        Called before any Raft message is sent, so that a follower's
        acknowledgement (and a leader's replication of its own entries) never
        precedes the fsync of the entries it covers.
        """
        if self._dirty:
            self._fsync_and_record()

    def flush(self) -> None:
        """FileJournal's name for making writes durable (pysyncobj itself never calls it)."""
        self.sync()

    @property
    def size_bytes(self) -> int:
        """Length of the journal file, which is also about what its entries take in memory."""
        return self._end

    def bytes_through(self, idx: int) -> int:
        """Bytes of the entries up to and including index `idx` (what compacting
        up to there could free)."""
        if not self._entries or idx < self._entries[0][1]:
            return 0
        pos = idx - self._entries[0][1] + 1
        end = self._end if pos >= len(self._entries) else self._offsets[pos]
        return end - FILE_HEADER_SIZE

    @property
    def synced_length(self) -> int:
        """Length in bytes of the journal file as of the last fsync."""
        return self._synced

    def _store_meta(self) -> None:
        """Write the metadata durably; the journal is synced first, so a stored
        commit index never covers entries that a power loss could erase."""
        self.sync()
        meta = {
            "currentTerm": self._term,
            "votedForNodeId": self._vote,
            "raftCommitIndex": self._commit_index,
        }
        data = json.dumps(meta, sort_keys=True).encode()
        replace_durably(self.meta_path, self.meta_path + ".tmp", [data])
        self._meta_dirty = False

    def _rewrite(self, entries: list[Entry]) -> None:
        """Replace the file with one holding exactly `entries`, atomically and durably."""
        frames = [_frame(*entry) for entry in entries]
        self._lower_recorded_sync(FILE_HEADER_SIZE + sum(len(f) for f in frames))
        tmp = self.path + ".tmp"
        replace_durably(self.path, tmp, [_file_header(), *frames])
        new_fd = os.open(self.path, os.O_RDWR)
        os.close(self._fd)
        self._fd = new_fd
        self._entries = list(entries)
        self._offsets = []
        offset = FILE_HEADER_SIZE
        for frame in frames:
            self._offsets.append(offset)
            offset += len(frame)
        self._end = offset
        # Already fsynced by _replace_durably: only record the new length.
        self._dirty = False
        self._synced = self._end
        os.pwrite(self._synced_fd, _SYNCED.pack(self._synced), 0)

    # ---- the pysyncobj Journal interface ----------------------------------------------

    @_stop_on_io_error
    def add(self, command: bytes | str, idx: int, term: int) -> None:
        """Append an entry: written to the file now, durable at the next `sync`."""
        cmd = to_bytes(command)
        if self._entries and idx != self._entries[-1][1] + 1:
            # Recovery would treat the gap as the end of the log and cut everything after it.
            raise ValueError(f"entry index {idx} does not follow {self._entries[-1][1]}")
        frame = _frame(cmd, idx, term)
        pwrite_all(self._fd, frame, self._end)
        self._entries.append((cmd, idx, term))
        self._offsets.append(self._end)
        self._end += len(frame)
        self._dirty = True
        if cmd[:1] == _MEMBERSHIP_BYTE:
            change = _change(cmd)
            if change is not None:
                self._changes.append((idx, change))
                self.members_version += 1

    @_stop_on_io_error
    def clear(self) -> None:
        """Drop every entry, durably (pysyncobj re-adds the snapshot's two entries next;
        the replica then sets `base` from the snapshot)."""
        if self._entries:
            self._fold_changes_before(self._entries[-1][1] + 1)
        self._rewrite([])

    @_stop_on_io_error
    def deleteEntriesFrom(self, entryFrom: int) -> None:
        """Drop the entries at list positions >= entryFrom; truncated and fsynced now.

        Durable at once: a follower drops conflicting entries before appending
        the leader's, and a power loss must not bring the old ones back.
        """
        start = slice(entryFrom, None).indices(len(self._entries))[0]
        if start >= len(self._entries):
            return
        self._forget_changes_from(self._entries[start][1])
        self._end = self._offsets[start]
        del self._entries[start:]
        del self._offsets[start:]
        self._lower_recorded_sync(self._end)
        os.ftruncate(self._fd, self._end)
        self._fsync_and_record()

    @_stop_on_io_error
    def deleteEntriesTo(self, entryTo: int) -> None:
        """Drop the entries at list positions < entryTo (log compaction), durably.

        The kept entries are copied to a new file that replaces the old one, so a
        crash leaves either the old or the new journal, both valid. pysyncobj
        compacts right after renaming its snapshot dump into this directory
        without an fsync of the directory; the fsync here makes that rename
        durable first, so a power loss never leaves a compacted journal beside
        an older dump.
        """
        start = slice(entryTo, None).indices(len(self._entries))[0]
        if start == 0:
            return
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        if start < len(self._entries):
            self._fold_changes_before(self._entries[start][1])
        else:
            self._fold_changes_before(self._entries[-1][1] + 1)
        self._rewrite(self._entries[start:])

    def align_to_snapshot(self, prev_entry: Sequence[Any], last_entry: Sequence[Any]) -> bool:
        """Drop the entries before the snapshot's last two entries, if the journal holds them.

        pysyncobj compacts the journal only after writing the snapshot dump; when
        it later loads the dump it clears the journal unless the journal starts
        with exactly the dump's two entries. A crash between dump and compaction
        would then lose every entry after the snapshot. Aligning first avoids that.
        Returns False (and changes nothing) when the entries are not found.
        """
        if not self._entries:
            return False
        prev_cmd, prev_idx, prev_term = prev_entry
        last_cmd, last_idx, last_term = last_entry
        pos = prev_idx - self._entries[0][1]
        if last_idx != prev_idx + 1 or pos < 0 or pos + 1 >= len(self._entries):
            return False
        if self._entries[pos] != (to_bytes(prev_cmd), prev_idx, prev_term):
            return False
        if self._entries[pos + 1] != (to_bytes(last_cmd), last_idx, last_term):
            return False
        self.deleteEntriesTo(pos)
        return True

    @overload
    def __getitem__(self, item: int) -> Entry: ...

    @overload
    def __getitem__(self, item: slice) -> list[Entry]: ...

    def __getitem__(self, item: int | slice) -> Entry | list[Entry]:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        """Lazy: stored by the next `onOneSecondTimer` or term write.

        pysyncobj calls this on every heartbeat; the commit index is only a
        hint after a restart (a lower value is always safe).
        """
        if raftCommitIndex != self._commit_index:
            self._commit_index = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return 1 if self._commit_index is None else self._commit_index

    @_stop_on_io_error
    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:
        """Durable before returning: a vote request or grant follows immediately."""
        self._term = term
        self._vote = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:
        return self._term

    def getVotedForNodeId(self) -> str | None:
        return self._vote

    @_stop_on_io_error
    def onOneSecondTimer(self) -> None:
        if self._meta_dirty:
            self._store_meta()

    def close(self) -> None:
        """Close the files without syncing (what kill -9 would leave behind)."""
        if self._closed:
            return
        self._closed = True
        for fd in (self._fd, self._synced_fd):
            if fd >= 0:
                os.close(fd)

    def _destroy(self) -> None:
        """Sync the entries, store pending metadata, close. Idempotent."""
        if self._closed:
            return
        self.sync()
        if self._meta_dirty:
            self._store_meta()
        self.close()
