"""The Saga Log as a pysyncobj state machine: the IO edge between Raft and SagaLog.

What this module adds to pysyncobj, and why:

* **One replicated method** (`apply_batch`) taking encoded bytes. pysyncobj numbers
  replicated methods by sorted name, so there is exactly one, and the schema
  evolves in proto/ instead.
* **A durable journal** (`sagalog.journal.DurableJournal`) instead of pysyncobj's
  mmap journal, which never fsyncs. Entries are written on append and fsynced
  before this node sends any Raft message that vouches for them
  (`_SyncingTransport`): a follower's acknowledgement and a vote leave only after
  the entries behind them are on disk. Term and vote are fsynced when they change.
  The leader's own fsync runs beside replication (Raft thesis 10.2.1): its
  AppendEntries leave at once, and it fsyncs before the Raft loop reads any answer,
  so it counts itself toward a majority only for entries already on its disk.
* **Snapshots without fork or pickled handles, off the Raft thread**: a RocksDB
  checkpoint taken on the Raft thread is tarred on a thread of its own
  (`sagalog.snapshot`); the deserializer restores it only when the live store is
  behind the snapshot, and aligns the journal so a crash between writing the
  dump and compacting the journal loses nothing.
* **A journal bounded in bytes**: the journal holds its entries in memory, and
  pysyncobj compacts only by entry count. A snapshot is also due once the applied
  entries in the journal pass JOURNAL_COMPACT_BYTES.
* **Raft's log-matching rule on followers** (`align_append_entries`). pysyncobj
  truncates everything after `prevLogIdx` on every AppendEntries, conflict or
  not. A stale or shorter AppendEntries (the leader pipelines, and resends from
  a lower index after a reset) then drops entries the follower has already
  acknowledged, which the leader may have counted towards a commit: kill every
  node in that window and a committed entry is gone (seen as diverged replicas
  after a whole-cluster restart). Messages are rewritten so that pysyncobj only
  deletes an entry that really conflicts with the leader's.
* **ReadIndex** (`sagalog.readindex`): AppendEntries carry a read round that
  followers echo in their answers, so a leader confirms that it still leads with
  one heartbeat round shared by every read waiting, instead of a log entry per read.
* **Read before campaigning**: a follower whose election timer expired reads its
  sockets before it campaigns, so a vote request that arrived while its loop was
  held up gets its vote instead of a rival candidacy (a split vote).
* **Fail-stop**: a local storage failure or a bug inside apply ends the process.
  (An exception raised inside a replicated method would be retried on every tick
  and freeze the cluster; skipping the entry would diverge this replica.)
"""

from __future__ import annotations

import collections
import io
import json
import logging
import os
import pickle
import random
import shutil
import struct
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pysyncobj.syncobj as pso_syncobj
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.monotonic import monotonic as raft_clock  # not time.monotonic's clock
from pysyncobj.transport import TCPTransport

from sagalog.codec import MAX_BATCH_BYTES
from sagalog.framecipher import EncryptedFrames, FrameCipher
from sagalog.fsync import fsync_dir, fsync_file, fsync_tree
from sagalog.journal import DurableJournal, Entry
from sagalog.kv import StoreError
from sagalog.log import LogFormatTooNew, SagaLog
from sagalog.readindex import PendingRead, ReadRefused, ReadRounds
from sagalog.rocks import RocksKV
from sagalog.snapshot import BackgroundSerializer, Writer

log = logging.getLogger(__name__)

EXIT_STORAGE_FAILURE = 74  # EX_IOERR


@dataclass(frozen=True)
class RaftTiming:
    """Raft timers, in milliseconds. pysyncobj's defaults make a commit wait on a
    100 ms timer and let an isolated leader believe in itself for 30 s."""

    # The longest the Raft loop sleeps without socket events. Proposals and reads
    # wake it through pysyncobj's pipe, and answers are socket events, so only the
    # timers (heartbeat, election, fallback) wait for a tick: 5 ms cost each idle
    # node 8-9 % of a core here, 20 ms 3.7-5 %.
    tick_ms: int = 20
    append_period_ms: int = 25  # heartbeat interval
    election_min_ms: int = 400
    election_max_ms: int = 800
    # A leader without a majority's answers for this long steps down. Below the
    # election timeout, so that an isolated leader stops before a new one is elected.
    leader_fallback_ms: int = 300
    reconnect_ms: int = 150  # redial interval to a lost peer
    connection_timeout_ms: int = 1000
    rejoin_grace_ms: int = 1500  # a restarted node waits this long before it may campaign

    def validate(self) -> None:
        if self.election_min_ms <= 3 * self.append_period_ms:
            raise ValueError(
                "election_min_ms must exceed 3 x append_period_ms (pysyncobj requires it)"
            )
        if self.election_max_ms < self.election_min_ms:
            raise ValueError("election_max_ms must be >= election_min_ms")
        if not 0 < self.tick_ms <= self.append_period_ms:
            raise ValueError("tick_ms must be in (0, append_period_ms]")
        if self.leader_fallback_ms <= 2 * self.append_period_ms:
            raise ValueError("leader_fallback_ms must exceed 2 x append_period_ms")
        if self.leader_fallback_ms >= self.election_min_ms:
            raise ValueError(
                "leader_fallback_ms must be below election_min_ms, so that an isolated "
                "leader steps down before a new leader can be elected"
            )
        if self.reconnect_ms <= 0:
            raise ValueError("reconnect_ms must be positive")


def fail_stop(message: str) -> None:
    """End the process now: a replica that cannot apply an entry must not go on."""
    log.critical("FAIL-STOP: %s", message)
    logging.shutdown()
    os._exit(EXIT_STORAGE_FAILURE)


# A snapshot is due once the journal (held in memory too) is this large, whatever
# its entry count: bulk loads write entries of up to 8 MiB.
JOURNAL_COMPACT_BYTES = 64 * 1024 * 1024
APPLY_BUDGET_S = 0.05  # longest run of applying before the Raft loop reads its sockets
KEEPALIVE_S = 0.25  # well below connection_timeout_ms
STALL_WARN_S = 0.15  # half the leader fallback: a stall this long is logged
_ROLES = {0: "follower", 1: "candidate", 2: "leader"}  # pysyncobj's _RAFT_STATE, for logs
_KEEPALIVE = {"type": "keepalive"}  # a type pysyncobj does not know; never passed to it
READ_ROUND = "read_round"  # our field in AppendEntries and their answers; pysyncobj ignores it
# The largest frame a peer may send: one AppendEntries holds at most one batch's worth
# of entries (raft_conf), pickled, compressed and, with the password, Fernet-encoded
# (base64: 4/3). pysyncobj itself buffers whatever a 32-bit length prefix announces.
MAX_FRAME_BYTES = 2 * (MAX_BATCH_BYTES + 64 * 1024) + (1 << 20)
# An incoming connection that has not said which peer it is by then is closed
# (pysyncobj keeps a silent connection open for good).
AUTH_TIMEOUT_S = 3.0


class _SyncingTransport(TCPTransport):
    """TCP transport that makes the journal durable before any message that
    vouches for its entries leaves, and by the end of every tick.

    A leader's AppendEntries are the exception: they go before the leader's own
    fsync, which then overlaps the network round trip and the followers' fsyncs
    (Raft thesis 10.2.1) instead of coming before them, and covers every entry
    proposed in the tick at once. The transport's tick is the last thing the Raft
    loop does before it polls its sockets (pysyncobj runs the tick callbacks just
    before `poll`), so the fsync overlaps the answers' way back; and
    `SagaLogRaft._onTick` syncs again before pysyncobj computes the commit index
    (a cheap no-op unless a new leader's no-op entry was added inside the poll),
    so that index never covers an entry that is not on the leader's own disk.
    Answers, votes and everything else still fsync first.

    It keeps every link busy: pysyncobj checks a connection's read timeout when it
    next sends on it, so the first message on an idle link (followers never talk
    to each other while a leader lives) closes the link and is lost. That message
    is a candidate's vote request, right after a leader died: the election failed
    and took another timeout (terms went up by two per failover). A keepalive to
    every peer each KEEPALIVE_S keeps links fresh, and a silent peer still trips
    the read timeout.

    It also applies the link faults of a fault file when the node was started
    with one (a testing aid; off by default): see `LinkFaults`."""

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any) -> None:
        super().__init__(syncObj, selfNode, otherNodes)
        self._unknown_since: dict[Any, float] = {}  # incoming connection -> when accepted
        path = getattr(syncObj, "_fault_file", None)
        self._faults = LinkFaults(path) if path else None
        self._next_keepalive = 0.0
        self._echo_round: dict[Any, int] = {}  # peer -> round of its last AppendEntries

    def send(self, node: Any, message: Any) -> bool:
        kind = message.get("type")
        if kind != "append_entries":  # those are synced at the end of the tick
            self._syncObj._journal.sync()
        reads = getattr(self._syncObj, "_reads", None)  # SagaLogRaft's (not the bench's)
        if kind == "append_entries" and reads is not None:
            message[READ_ROUND] = reads.sent
        elif kind == "next_node_idx":
            # The answer to the AppendEntries being handled: echo its round.
            message[READ_ROUND] = self._echo_round.get(node, 0)
        if self._faults is not None and not self._faults.outgoing(node, message):
            return True  # dropped or delayed: to the sender it looks sent
        return bool(super().send(node, message))

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        if self._faults is not None and self._faults.blocks_from(node):
            return
        kind = message.get("type")
        if kind == "keepalive":
            return
        if kind == "append_entries":
            self._echo_round[node] = message.get(READ_ROUND, 0)
            align = getattr(self._syncObj, "_align_append_entries", None)  # SagaLogRaft's
            if align is not None:
                align(message)
        elif kind == "next_node_idx" and READ_ROUND in message:
            answered = getattr(self._syncObj, "_read_round_answered", None)
            if answered is not None:
                answered(node, message[READ_ROUND])
        super()._onMessageReceived(node, message)

    # ---- who may talk to this node -------------------------------------------------

    def _onNewIncomingConnection(self, conn: Any) -> None:
        super()._onNewIncomingConnection(conn)
        self._unknown_since[conn] = time.monotonic()
        read = conn._TcpConnection__processRead
        conn._TcpConnection__processRead = lambda: _read_capped(conn, read)

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        # Utility commands (status, leadership transfer, membership) and read-only
        # peers are pysyncobj features this cluster does not use: refused outright.
        handshake = bool(self._syncObj.encryptor) and not conn.sendRandKey
        if not handshake and (isinstance(message, list) or message == "readonly"):
            log.warning("refused a Raft connection that sent %.40r", message)
            self._unknown_since.pop(conn, None)
            self._unknownConnections.discard(conn)
            conn.disconnect()
            return
        super()._onIncomingMessageReceived(conn, message)
        if conn not in self._unknownConnections:
            self._unknown_since.pop(conn, None)

    def _close_silent_connections(self, now: float) -> None:
        for conn, since in list(self._unknown_since.items()):
            if conn not in self._unknownConnections:
                del self._unknown_since[conn]
            elif now - since > AUTH_TIMEOUT_S:
                del self._unknown_since[conn]
                self._unknownConnections.discard(conn)
                conn.disconnect()

    def _onTick(self) -> None:
        super()._onTick()
        now = time.monotonic()
        self._close_silent_connections(now)
        if now >= self._next_keepalive:
            self._next_keepalive = now + KEEPALIVE_S
            for peer in list(self._connections):
                self.send(peer, _KEEPALIVE)
        if self._faults is not None:
            for node, message in self._faults.due():
                super().send(node, message)
        # Last before the poll that reads answers: see the class docstring.
        self._syncObj._journal.sync()


def _read_capped(conn: Any, read: Callable[[], bool]) -> bool:
    """pysyncobj's read of a connection's socket, closing it on an oversized frame
    (or a negative length) before the frame is buffered."""
    more = read()
    buffer = conn._TcpConnection__readBuffer
    if len(buffer) >= 4:
        (length,) = struct.unpack("i", buffer[:4])
        if not 0 <= length <= MAX_FRAME_BYTES:
            log.warning("closed a Raft connection announcing a %d-byte frame", length)
            conn.disconnect()
            return False
    if len(buffer) > 2 * (MAX_FRAME_BYTES + 4):  # frames queued behind a small one
        log.warning("closed a Raft connection holding %d unread bytes", len(buffer))
        conn.disconnect()
        return False
    return more


class LinkFaults:
    """Raft link faults read from a JSON file, re-read when it changes:

        {"block_to": ["HOST:PORT", ...],     drop every message to these peers
         "block_from": ["HOST:PORT", ...],   drop every message from them
         "loss": {"HOST:PORT": 0.2},         drop this share of messages to a peer
         "delay_ms": {"HOST:PORT": 50}}      hold messages to a peer this long

    Addresses are peers' Raft addresses. Blocking both ways isolates a node; one
    way makes an asymmetric partition. Used by the fault-injection harness
    (`cluster/faults.py`); a node started without `--fault-file` has none."""

    CHECK_INTERVAL_S = 0.05
    MAX_DELAYED = 100_000  # bound on held messages per peer; beyond it they are dropped

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime = 0.0
        self._next_check = 0.0
        self.block_to: set[str] = set()
        self.block_from: set[str] = set()
        self.loss: dict[str, float] = {}
        self.delay_ms: dict[str, int] = {}
        # per peer address, in send order: (due time, node, message)
        self._held: dict[str, collections.deque[tuple[float, Any, Any]]] = {}

    def _refresh(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self.CHECK_INTERVAL_S
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError:
            mtime = 0.0
        if mtime == self._mtime:
            return
        self._mtime = mtime
        rules: dict[str, Any] = {}
        if mtime:
            try:
                with open(self.path) as f:
                    rules = json.load(f)
            except (OSError, ValueError):
                log.warning("unreadable fault file %s: keeping the previous rules", self.path)
                return
        self.block_to = set(rules.get("block_to", []))
        self.block_from = set(rules.get("block_from", []))
        self.loss = {k: float(v) for k, v in rules.get("loss", {}).items()}
        self.delay_ms = {k: int(v) for k, v in rules.get("delay_ms", {}).items()}
        log.info("link faults now %s", rules)

    def outgoing(self, node: Any, message: Any) -> bool:
        """True: send it now. False: dropped, or held for later (`due`).

        Messages to one peer stay in order: while any are held for it, new ones
        queue behind them even once the delay is lifted. (Reordered AppendEntries
        make pysyncobj truncate entries a follower has already acknowledged.)"""
        self._refresh()
        addr = node.address
        if addr in self.block_to:
            return False
        if random.random() < self.loss.get(addr, 0.0):
            return False
        delay = self.delay_ms.get(addr, 0)
        queue = self._held.get(addr)
        if not delay and not queue:
            return True
        if queue is None:
            queue = self._held[addr] = collections.deque()
        if len(queue) < self.MAX_DELAYED:
            queue.append((time.monotonic() + delay / 1000, node, message))
        return False

    def blocks_from(self, node: Any) -> bool:
        self._refresh()
        return node.address in self.block_from

    def due(self) -> list[tuple[Any, Any]]:
        now = time.monotonic()
        out = []
        for queue in self._held.values():
            while queue and queue[0][0] <= now:
                _, node, message = queue.popleft()
                out.append((node, message))
        return out


def align_append_entries(journal: Sequence[Entry], message: dict[str, Any]) -> int | None:
    """Rewrite an AppendEntries whose previous entry this follower holds, so that
    pysyncobj's handling of it follows Raft's rules (§5.3):

    * an entry already held with the same term is kept, not deleted and re-added;
    * an entry whose term differs conflicts: it and everything after it go;
    * entries after the message's last one stay, and the answer and the commit
      index cover only what the message proved (its last entry).

    pysyncobj deletes everything after `prevLogIdx` whenever the log extends past
    it, appends the message's entries, and answers "my log now ends at the last
    of them". So: move `prevLogIdx` to the last entry held in agreement and keep
    only the entries after it; cap `commit_index` at what the message proved.
    Returns the index of the first conflicting entry, the only deletion this
    message warrants, or None (then pysyncobj's deletion must be refused).
    Messages whose previous entry is missing or differs are left as they are:
    pysyncobj rejects them.
    """
    prev = message.get("prevLogIdx")
    if prev is None or "transmission" in message or not len(journal):
        return None
    first, last = journal[0][1], journal[-1][1]
    if not first <= prev <= last or journal[prev - first][2] != message["prevLogTerm"]:
        return None
    entries = message.get("entries") or []
    conflict = None
    keep = len(entries)  # entries[:keep] are held already, in agreement
    for i, (_, idx, term) in enumerate(entries):
        if idx > last:
            keep = i
            break
        if journal[idx - first][2] != term:
            keep, conflict = i, idx
            break
    proven = prev + len(entries)
    agreed = prev + keep
    message["prevLogIdx"] = agreed
    message["prevLogTerm"] = journal[agreed - first][2]
    message["entries"] = entries[keep:]
    message["commit_index"] = min(message["commit_index"], proven)
    return conflict


def raft_conf(
    timing: RaftTiming,
    data_dir: str,
    bind_addr: str,
    compaction_min_entries: int = 50_000,
    **hooks: Any,
) -> SyncObjConf:
    """The pysyncobj configuration of a Saga Log node (and of the bench's bare
    counter, which must run with exactly the same settings).

    `bind_addr` is the node's own Raft HOST:PORT: without it pysyncobj listens on
    every interface (0.0.0.0), whatever host the node's address names. No
    password here: frames are sealed by `EncryptedFrames` (sagalog.framecipher)."""
    return SyncObjConf(
        bindAddress=bind_addr,
        autoTickPeriod=timing.tick_ms / 1000,
        appendEntriesPeriod=timing.append_period_ms / 1000,
        raftMinTimeout=timing.election_min_ms / 1000,
        raftMaxTimeout=timing.election_max_ms / 1000,
        leaderFallbackTimeout=timing.leader_fallback_ms / 1000,
        connectionRetryTime=timing.reconnect_ms / 1000,
        connectionTimeout=timing.connection_timeout_ms / 1000,
        # Each proposal is sent at once: the Saga Log batches records into entries.
        appendEntriesUseBatch=False,
        # Never split an entry into chunks ("transmission"): the chunked path hides
        # the entry from `align_append_entries`. The largest entry is one batch.
        appendEntriesBatchSizeBytes=MAX_BATCH_BYTES + 64 * 1024,
        commandsQueueSize=100_000,
        journalFile=os.path.join(data_dir, "journal"),
        fullDumpFile=os.path.join(data_dir, "snapshot"),
        useFork=False,
        logCompactionMinEntries=compaction_min_entries,
        logCompactionMinTime=24 * 3600,
        dynamicMembershipChange=False,
        **hooks,
    )


_parts_patch_lock = threading.Lock()


@contextmanager
def _durable_journal(
    journal: DurableJournal, serializer_class: type | None = None
) -> Iterator[None]:
    """pysyncobj builds its journal (and its snapshot serializer) by module-level
    names, with no hook; substitute ours for the duration of one constructor call."""
    with _parts_patch_lock:
        journal_factory, default_serializer = pso_syncobj.createJournal, pso_syncobj.Serializer
        pso_syncobj.createJournal = lambda _path: journal
        pso_syncobj.Serializer = serializer_class or default_serializer
        try:
            yield
        finally:
            pso_syncobj.createJournal = journal_factory
            pso_syncobj.Serializer = default_serializer


class SagaLogRaft(EncryptedFrames, SyncObj):  # type: ignore[misc]
    """A Raft replica of the Saga Log, with its files under `data_dir`:

    data_dir/journal       Raft journal (+ .meta term/vote, + .synced test aid)
    data_dir/snapshot      last snapshot: tar of raft metadata + RocksDB checkpoint
    data_dir/db            live RocksDB store
    """

    def __init__(
        self,
        self_addr: str,
        peer_addrs: list[str],
        data_dir: str,
        timing: RaftTiming,
        password: str | None = None,
        compaction_min_entries: int = 50_000,
        on_state_changed: Callable[[int, int], None] | None = None,
        fault_file: str | None = None,
        auto_tick: bool = True,  # False: the caller drives `doTick` (tests)
    ) -> None:
        timing.validate()
        self.data_dir = data_dir
        self._fault_file = fault_file
        self._auto_tick = auto_tick
        self._on_state_changed = on_state_changed
        self._cipher = FrameCipher(password) if password else None
        os.makedirs(data_dir, exist_ok=True)
        self._store_lock = threading.RLock()  # held by readers and by a store swap
        for leftover in ("snapshot.building", "checkpoint.building"):  # a crash mid-snapshot
            shutil.rmtree(self._path(leftover), ignore_errors=True)
            if os.path.isfile(self._path(leftover)):
                os.remove(self._path(leftover))
        self._kv = RocksKV(self._path("db"))
        self.saga_log = SagaLog(self._kv)
        self._journal = DurableJournal(self._path("journal"))
        # The one follower truncation the AppendEntries being handled warrants.
        self._approved_deletion: int | None = None
        self._commit_floor = 0  # see _SyncObj__applyLogEntries
        self._reads = ReadRounds()
        # The last entry applied to the store (raftLastApplied moves only after
        # apply_batch returns); readers wait on the condition for it to pass an index.
        self._applied = threading.Condition()
        self._applied_index = self.saga_log.applied_index()
        self._applied_waiters = 0
        # Called on the Raft thread after a snapshot replaced the store wholesale.
        self.on_store_replaced: Callable[[], None] | None = None
        self._pulse = time.monotonic()  # when the Raft loop last started or ended a tick
        self._stall_quiet_until = 0.0
        conf = raft_conf(
            timing,
            data_dir,
            self_addr,
            compaction_min_entries=compaction_min_entries,
            serializer=self._start_snapshot,
            deserializer=self._deserialize,
            onStateChanged=self._state_changed,
            autoTick=auto_tick,
        )
        with _durable_journal(self._journal, BackgroundSerializer):
            super().__init__(self_addr, peer_addrs, conf, transportClass=_SyncingTransport)
        self._snapshots: BackgroundSerializer = self._SyncObj__serializer
        if self.raftCurrentTerm > 0:
            # A restarted node that times out before the current leader reaches it
            # would start an election at a higher term and depose a healthy leader
            # (pysyncobj has no PreVote). Give the leader time to reach it first.
            self._SyncObj__raftElectionDeadline = raft_clock() + timing.rejoin_grace_ms / 1000

    def _path(self, name: str) -> str:
        return os.path.join(self.data_dir, name)

    # ---- the Raft loop's pulse -------------------------------------------------------

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N803 (pysyncobj's name)
        start = time.monotonic()
        between, self._pulse = start - self._pulse, start
        try:
            self._start_read_round()
            self._read_before_campaigning()
            # Before the commit index is computed: a new leader's no-op entry is added
            # and sent from inside a poll, whose answer can be read in that same poll.
            self._journal.sync()
            SyncObj._onTick(self, timeToWait)
        finally:
            end = self._pulse = time.monotonic()
            self._report_stall(between, end - start, end)

    def _read_before_campaigning(self) -> None:
        """Read what waits on the sockets before an expired election timer starts a
        campaign. pysyncobj checks the timer at the start of a tick and reads only
        at its end: a follower whose loop did not run for a while (a busy machine)
        campaigned even with the other follower's vote request already waiting, so
        both voted for themselves and the election took another timeout. Voting for
        that candidate, or hearing from a live leader, resets the timer. (It does
        not prevent two timers firing within one candidate's term write of each
        other: see bench/README.md, failover.)"""
        if (
            self._SyncObj__raftState != 2  # type: ignore[has-type]
            and self._SyncObj__raftElectionDeadline < raft_clock()
            and self._SyncObj__transport.ready
            and not self._SyncObj__needLoadDumpFile  # the snapshot loads first
        ):
            self._poller.poll(0)

    def _report_stall(self, between: float, within: float, now: float) -> None:
        """Say when the Raft loop stood still long enough to cost a leader its office."""
        if max(between, within) < STALL_WARN_S or now < self._stall_quiet_until:
            return
        self._stall_quiet_until = now + 1.0
        log.warning(
            "raft loop stalled: %.0f ms before a tick, %.0f ms in it (%s; last applied %d)",
            between * 1000,
            within * 1000,
            _ROLES.get(self._SyncObj__raftState, "?"),
            self.raftLastApplied,
        )

    # ---- the one replicated method -------------------------------------------------

    @replicated
    def apply_batch(self, batch: bytes) -> bytes:
        """Apply an encoded RecordBatch; returns an encoded BatchResult. Never raises."""
        index = self.raftLastApplied + 1
        try:
            result = self.saga_log.apply_batch(batch, index)
            self._set_applied(index)
            return result
        except StoreError as exc:
            fail_stop(f"storage failure applying Raft entry {index}: {exc}")
        except LogFormatTooNew as exc:
            fail_stop(f"cannot apply Raft entry {index}: {exc}")
        except Exception:
            log.exception("bug: apply raised")
            fail_stop(f"unexpected error applying Raft entry {index}")
        raise AssertionError("unreachable")

    def _state_changed(self, old: int, new: int) -> None:
        """Log every role change; a leader stepping down says how long ago each peer
        last answered (its fallback fires when no majority answered in time)."""
        detail = ""
        if old == 2:
            now = raft_clock()
            last = getattr(self, "_SyncObj__lastResponseTime", {})
            ages = ", ".join(f"{n.address} {now - t:.2f} s" for n, t in last.items())
            detail = f"; last answers: {ages}"
        log.info(
            "raft %s -> %s in term %d%s",
            _ROLES.get(old, old),
            _ROLES.get(new, new),
            self.raftCurrentTerm,
            detail,
        )
        if self._on_state_changed is not None:
            self._on_state_changed(old, new)

    # ---- applying -------------------------------------------------------------------

    def _SyncObj__applyLogEntries(self) -> bool:
        """pysyncobj applies every committed entry in one go before it reads its
        sockets again. A follower with a backlog (a new leader proposing records
        for 10,000 resumed sagas) then answered nothing for most of a second, and
        the leader, hearing from no majority within its fallback, stepped down again
        and again. Apply for at most APPLY_BUDGET_S per tick; the rest next tick."""
        apply_all = SyncObj._SyncObj__applyLogEntries
        commit: int = self._SyncObj__raftCommitIndex  # type: ignore[has-type]
        if commit - self.raftLastApplied <= 1:
            return bool(apply_all(self))
        # The cap below is pysyncobj's commit index, lowered for a moment: readers on
        # other threads see `raftCommitIndex`, which never reports less than this.
        self._commit_floor = commit
        deadline = time.monotonic() + APPLY_BUDGET_S
        more = False
        try:
            while self.raftLastApplied < commit and time.monotonic() < deadline:
                self._SyncObj__raftCommitIndex = self.raftLastApplied + 1
                more = bool(apply_all(self)) or more
        finally:
            self._SyncObj__raftCommitIndex = commit
        return more

    @property
    def raftCommitIndex(self) -> int:
        # Read the live value first: if it is the lowered cap, the floor is set.
        live: int = self._SyncObj__raftCommitIndex  # type: ignore[has-type]
        return max(live, self._commit_floor)

    # ---- log matching --------------------------------------------------------------

    def _align_append_entries(self, message: dict[str, Any]) -> None:
        """Runs on the Raft thread just before pysyncobj handles an AppendEntries."""
        self._approved_deletion = None
        if message["term"] < self.raftCurrentTerm:
            return  # a deposed leader's message: pysyncobj ignores it
        if "prevLogIdx" not in message:
            # A snapshot chunk. pysyncobj would raise the commit index to the leader's
            # over whatever this log holds, stale suffix included; a completed install
            # proves nothing beyond the snapshot either. The next AppendEntries will.
            message["commit_index"] = min(message["commit_index"], self.raftCommitIndex)
            return
        if "transmission" in message:
            # A chunked entry: never sent (raft_conf; proposals are size-checked).
            log.warning("chunked AppendEntries at %s: pysyncobj's rule", message["prevLogIdx"])
            self._approved_deletion = message["prevLogIdx"] + 1
            return
        prev = message["prevLogIdx"]
        if prev is not None:
            self._drop_conflicting_suffix(prev, message["prevLogTerm"], message["term"])
        self._approved_deletion = align_append_entries(self._journal, message)

    def _SyncObj__deleteEntriesFrom(self, from_idx: int) -> None:
        """pysyncobj's follower truncation, limited to what `align_append_entries`
        found in conflict; any other call would drop entries in agreement."""
        if from_idx != self._approved_deletion:
            return
        if from_idx <= max(self.raftCommitIndex, self.raftLastApplied):
            log.critical("deleting committed entries from %d: Raft safety is broken", from_idx)
        SyncObj._SyncObj__deleteEntriesFrom(self, from_idx)

    def _drop_conflicting_suffix(self, prev_idx: int, prev_term: int, leader_term: int) -> None:
        """Raft's "an entry that conflicts with the leader's: delete it and all that
        follow", applied as soon as the leader's AppendEntries shows the conflict.

        pysyncobj only answers "go back one" and keeps its conflicting suffix; the
        leader, meanwhile, has pipelined AppendEntries beyond it, whose answers
        ("my log ends at N") reset the leader's next index forward again. A follower
        left with an uncommitted suffix from an old term (a leader crash) then never
        catches up (seen in chaos runs). Dropping the suffix makes every answer move
        the next index down. Safe: an entry whose term differs from the current
        leader's at the same index was never committed; committed and applied
        entries are never touched."""
        if leader_term < self.raftCurrentTerm:
            return  # a deposed leader's message; pysyncobj ignores it too
        journal = self._journal
        if not len(journal):
            return
        pos = prev_idx - journal[0][1]
        if pos <= 0 or pos >= len(journal) or journal[pos][2] == prev_term:
            return
        if prev_idx <= max(self.raftCommitIndex, self.raftLastApplied):
            return
        log.warning(
            "dropping %d uncommitted entries from index %d (term %d; the leader has term %d)",
            len(journal) - pos,
            prev_idx,
            journal[pos][2],
            prev_term,
        )
        journal.deleteEntriesFrom(pos)

    def _SyncObj__loadDumpFile(self, clearJournal: bool) -> None:  # noqa: N803 (pysyncobj's)
        """pysyncobj clears the whole journal when it installs a snapshot from the
        leader, acknowledged entries after the snapshot included. Raft (§7) keeps
        them when the log holds the snapshot's last entry. Keep them when, besides,
        this log ends in the leader's current term: then every entry in it agrees
        with the leader's (only the leader writes entries of its term, and log
        matching covers the rest), so pysyncobj's answer "my log ends here" is true.
        With clearJournal=False, pysyncobj still clears a journal that does not
        start with the snapshot's two entries (`_deserialize` aligns it first)."""
        journal = self._journal
        if clearJournal and len(journal) and journal[-1][2] == self.raftCurrentTerm:
            clearJournal = False
        SyncObj._SyncObj__loadDumpFile(self, clearJournal)

    # ---- ReadIndex -------------------------------------------------------------------

    def _start_read_round(self) -> None:
        """Raft thread: if reads wait for a round, start it with this tick's
        AppendEntries (sent at once, not at the next heartbeat)."""
        if self._SyncObj__raftState != 2:  # type: ignore[has-type]
            self._reads.refuse_all("this node is not the leader")
            return
        self._reads.refuse_other_terms(self.raftCurrentTerm, "the term changed")
        if self._reads.round_wanted():
            self._reads.start_round()
            self._SyncObj__newAppendEntriesTime = 0.0

    def _read_round_answered(self, node: Any, round_: int) -> None:
        """Raft thread: a follower answered an AppendEntries of round `round_`."""
        if self._SyncObj__raftState == 2:  # type: ignore[has-type]
            voters = self._SyncObj__otherNodes  # configured voters only, never read-only peers
            self._reads.answered(node, round_, voters, self.raftCurrentTerm)

    def read_index(self, timeout_s: float, term: int) -> int:
        """Leader only, any thread: an index such that every write acknowledged
        before this call is at or below it, once this node has confirmed that it
        still leads. `term`: the term in which the caller saw this node in office
        (its own entry committed in that term, so its commit index covers every
        older leader's writes); a read is confirmed only in that term.
        ReadRefused when it does not lead in it; TimeoutError."""
        if self._SyncObj__raftState != 2 or self.raftCurrentTerm != term:  # type: ignore[has-type]
            raise ReadRefused(f"this node is not the leader in term {term}")
        read: PendingRead = self._reads.request(self.raftCommitIndex, term)
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            notifier.notify()  # wake the Raft loop now rather than at its next tick
        return read.wait(timeout_s)

    def _set_applied(self, index: int) -> None:
        self._applied_index = index
        if self._applied_waiters:
            with self._applied:
                self._applied.notify_all()

    def wait_applied(self, index: int, timeout_s: float) -> bool:
        """Block until this node's store holds every entry up to `index`."""
        if self._applied_index >= index:
            return True
        with self._applied:
            self._applied_waiters += 1
            try:
                return self._applied.wait_for(lambda: self._applied_index >= index, timeout_s)
            finally:
                self._applied_waiters -= 1

    # ---- reads from other threads --------------------------------------------------

    def majority_heard_within(self, seconds: float) -> bool:
        """Leader only: did a majority (this node included) answer within `seconds`?

        The coordinator asks before every participant call. A leader that was paused
        (SIGSTOP) or cut off still believes it leads until its next tick; its old
        answers then look stale and it sends nothing a newer leader might contradict.
        """
        last = getattr(self, "_SyncObj__lastResponseTime", {})
        voters = list(self._SyncObj__otherNodes)  # configured peers only
        deadline = raft_clock() - seconds
        fresh = 1 + sum(1 for n in voters if last.get(n, 0.0) > deadline)
        return fresh > (len(voters) + 1) / 2

    @contextmanager
    def reading(self) -> Iterator[SagaLog]:
        """The current SagaLog, safe from a concurrent snapshot install."""
        with self._store_lock:
            yield self.saga_log

    # ---- snapshots -----------------------------------------------------------------

    def _SyncObj__tryLogCompaction(self) -> None:
        # Applied entries only: a snapshot covers no more, and a follower with a long
        # unapplied backlog would otherwise snapshot again after every entry it applies.
        if self._journal.bytes_through(self.raftLastApplied) > JOURNAL_COMPACT_BYTES:
            self._SyncObj__forceLogCompaction = True
        SyncObj._SyncObj__tryLogCompaction(self)

    def _start_snapshot(self, raft_data: Any) -> Writer:
        """On the Raft thread, where nothing else applies: a checkpoint of the store
        as of the snapshot's last entry. The returned writer tars it elsewhere."""
        checkpoint = self._path("checkpoint.building")
        shutil.rmtree(checkpoint, ignore_errors=True)
        self._kv.checkpoint(checkpoint)
        meta = pickle.dumps(raft_data)

        def write(filename: str) -> None:
            try:
                with tarfile.TarFile(filename, "w", copybufsize=1 << 20) as tar:
                    info = tarfile.TarInfo("raft.pickle")
                    info.size = len(meta)
                    tar.addfile(info, io.BytesIO(meta))
                    tar.add(checkpoint, arcname="db")
                fsync_file(filename)
            finally:
                shutil.rmtree(checkpoint, ignore_errors=True)

        return write

    def _deserialize(self, filename: str) -> Any:
        """Called at start-up (own snapshot) and when the leader sends one."""
        snapshots = getattr(self, "_SyncObj__serializer", None)
        if isinstance(snapshots, BackgroundSerializer):
            snapshots.cancel()  # ours, if one is being written, is older than this one
        try:
            # pysyncobj writes a received snapshot without fsync and then clears the
            # journal durably: make the snapshot durable first.
            fsync_file(filename)
            fsync_dir(self.data_dir)
            with tarfile.open(filename, "r") as tar:
                member = tar.extractfile("raft.pickle")
                assert member is not None
                raft_data = pickle.loads(member.read())
                last_entry, prev_entry = raft_data[0], raft_data[1]
                snapshot_index = last_entry[1]
                if self.saga_log.applied_index() < snapshot_index:
                    self._install(tar)
        except (OSError, tarfile.TarError, KeyError, pickle.UnpicklingError, StoreError) as exc:
            fail_stop(f"cannot load snapshot {filename}: {exc}")
        self._journal.align_to_snapshot(prev_entry, last_entry)
        return raft_data

    def _install(self, tar: tarfile.TarFile) -> None:
        """Replace the live store by the snapshot's checkpoint."""
        incoming = self._path("db.incoming")
        shutil.rmtree(incoming, ignore_errors=True)
        members = [m for m in tar.getmembers() if m.name == "db" or m.name.startswith("db/")]
        tar.extractall(incoming, members=members, filter="data")
        fsync_tree(incoming)
        with self._store_lock:
            self._kv.close()
            live = self._path("db")
            shutil.rmtree(live)
            os.replace(os.path.join(incoming, "db"), live)
            fsync_dir(self.data_dir)
            shutil.rmtree(incoming, ignore_errors=True)
            self._kv = RocksKV(live)
            listener = self.saga_log.listener
            self.saga_log = SagaLog(self._kv)
            self.saga_log.listener = listener
        self._set_applied(self.saga_log.applied_index())
        if self.on_store_replaced is not None:
            self.on_store_replaced()
        log.info("installed snapshot at index %d", self.saga_log.applied_index())

    def close(self) -> None:
        if not self._snapshots.wait(timeout=30):
            log.warning("closing with a snapshot still being written (it will be dropped)")
        if self._auto_tick:
            self.destroy_synchronous()
        else:
            self.destroy()
        with self._store_lock:
            self._kv.close()
