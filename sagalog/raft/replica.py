"""SagaLogRaft: the Saga Log as a pysyncobj state machine, with the overrides that
make pysyncobj durable and safe (see the package's docstring for each and why)."""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pysyncobj.syncobj as pso_syncobj
from pysyncobj import FAIL_REASON, SyncObj, replicated
from pysyncobj.monotonic import monotonic as raft_clock  # not time.monotonic's clock
from pysyncobj.node import TCPNode

from sagalog.framecipher import EncryptedFrames, FrameCipher
from sagalog.fsync import fsync_dir, fsync_file, fsync_tree
from sagalog.journal import DurableJournal
from sagalog.kv import StoreError
from sagalog.log import LogFormatTooNew, SagaLog
from sagalog.membership import ADD, REMOVE, raft_node
from sagalog.raft.matching import align_append_entries, stale_suffix
from sagalog.raft.status import ROLE_NAMES, RaftStatus, raft_status
from sagalog.raft.timing import RaftTiming, raft_conf
from sagalog.raft.transport import SyncingTransport
from sagalog.readindex import PendingRead, ReadRefused, ReadRounds
from sagalog.rocks import RocksKV
from sagalog.snapshot import BackgroundSerializer, Writer

log = logging.getLogger(__name__)

EXIT_STORAGE_FAILURE = 74  # EX_IOERR
# A snapshot is due once the journal (held in memory too) is this large, whatever
# its entry count: bulk loads write entries of up to 8 MiB.
JOURNAL_COMPACT_BYTES = 64 * 1024 * 1024
APPLY_BUDGET_S = 0.05  # longest run of applying before the Raft loop reads its sockets
STALL_WARN_S = 0.15  # half the leader fallback: a stall this long is logged


def fail_stop(message: str) -> None:
    """End the process now: a replica that cannot apply an entry must not go on."""
    log.critical("FAIL-STOP: %s", message)
    logging.shutdown()
    os._exit(EXIT_STORAGE_FAILURE)


_parts_patch_lock = threading.Lock()


@contextmanager
def durable_journal(
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
        self_addr: str | TCPNode,
        peer_addrs: Sequence[str | TCPNode],
        data_dir: str,
        timing: RaftTiming,
        password: str | None = None,
        compaction_min_entries: int = 50_000,
        on_state_changed: Callable[[int, int], None] | None = None,
        fault_file: str | None = None,
        auto_tick: bool = True,  # False: the caller drives `doTick` (tests)
        joining: bool = False,
    ) -> None:
        """`self_addr` and `peer_addrs`: Raft addresses, or nodes carrying their names
        (sagalog.membership.raft_node). The peers are the configuration this node
        starts from when its log does not say otherwise: the first members, or,
        `joining`, the members of the cluster it joins without being one (it
        receives the log from the leader, votes and campaigns only once an entry
        adding it is in its log: Cluster.AddNode)."""
        timing.validate()
        self_node = _as_node(self_addr)
        peers = [_as_node(p) for p in peer_addrs]
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
        start = {p.id: p for p in peers}
        if not joining:
            start[self_node.id] = self_node
        self._journal.set_base(start)  # a snapshot, once loaded, says better
        self._self_node = self_node
        self._members = self._journal.members()  # replaced whole: read by other threads
        self._members_seen = -1
        self._learners: dict[str, TCPNode] = {}  # the leader's, by Raft address
        self._learner_requests: collections.deque[tuple[str, TCPNode]] = collections.deque()
        self._snapshot_members: Any = None  # the configuration of the snapshot being loaded
        # The one follower truncation the AppendEntries being handled warrants.
        self._approved_deletion: int | None = None
        self._commit_floor = 0  # see _SyncObj__applyLogEntries
        self._reads = ReadRounds()
        self._transfers: collections.deque[str] = collections.deque(maxlen=8)
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
            self_node.id,
            compaction_min_entries=compaction_min_entries,
            serializer=self._start_snapshot,
            deserializer=self._deserialize,
            onStateChanged=self._state_changed,
            autoTick=auto_tick,
        )
        # pysyncobj starts from the latest configuration in this node's log (its
        # own would be the command line's until it applied every change again).
        others = [n for a, n in self._members.items() if a != self_node.id]
        with durable_journal(self._journal, BackgroundSerializer):
            super().__init__(self_node, others, conf, transportClass=SyncingTransport)
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
            self._start_transfers()
            self._read_before_campaigning()
            # After that poll: a change it brought counts in this tick's election.
            self._reconcile_members()
            self._gate_campaigns()
            self._tend_learners()
            # Before the commit index is computed: a new leader's no-op entry is added
            # and sent from inside a poll, whose answer can be read in that same poll.
            self._journal.sync()
            SyncObj._onTick(self, timeToWait)
        finally:
            end = self._pulse = time.monotonic()
            self._report_stall(between, end - start, end)

    # ---- membership -----------------------------------------------------------------

    def members(self) -> dict[str, TCPNode]:
        """Any thread: the configuration this node uses (Raft address -> node, this
        node included when it is a member): the latest in its log."""
        return self._members

    def is_member(self) -> bool:
        return self._self_node.id in self._members

    def change_pending(self) -> bool:
        """A membership change is in the log and not committed yet."""
        return bool(self._journal.changes_after(self.raftCommitIndex))

    def _SyncObj__doChangeCluster(self, request: Any, reverse: bool = False) -> bool:
        """pysyncobj's: change the configuration now, entry by entry, on append,
        on rollback and again on apply. Here nothing changes (the configuration
        is computed from the log: `_reconcile_members`); on the leader's path the
        answer decides whether pysyncobj appends the change: one change at a time,
        a new node only, and never this node's own removal."""
        if reverse:
            return True
        kind = request[0]
        node = request[2] if len(request) >= 3 else request[1]
        address = node.id if isinstance(node, TCPNode) else str(node)  # what the fold applies
        if self._journal.changes_after(self.raftCommitIndex):
            return False  # the previous change is not committed yet
        members = self._journal.members()
        if kind == ADD:
            # Only a learner this leader has caught up: a change forwarded to a new
            # leader (leadership moved meanwhile) must not skip the catch-up.
            return address not in members and address in self._learners
        if kind == REMOVE:
            return address in members and address != self._self_node.id
        return False

    def _reconcile_members(self) -> None:
        """Raft thread: make pysyncobj's peers the latest configuration in the log."""
        if self._journal.members_version == self._members_seen:
            return
        self._members_seen = self._journal.members_version
        members = self._journal.members()
        self._members = members
        others: set[Any] = self._SyncObj__otherNodes  # type: ignore[has-type]
        now = raft_clock()
        current = {n.id: n for n in others}
        for address in current.keys() - members.keys():
            node = current[address]
            others.discard(node)
            self._unlink(node)
            log.info("raft: %s left the configuration", address)
        for address in members.keys() - current.keys() - {self._self_node.id}:
            node = self._learners.pop(address, None)
            if node is not None:  # a caught-up learner: its link and progress stay
                self._SyncObj__readonlyNodes.discard(node)
            else:
                node = members[address]
                self._link(node)
            others.add(node)
            self._SyncObj__lastResponseTime[node] = now
            log.info("raft: %s joined the configuration", address)

    def _may_campaign(self) -> bool:
        """In the latest configuration, or in the committed one (Raft thesis 4.2.2:
        a node whose removal is not committed yet may still be needed to elect a
        leader; it then does not count its own vote: `_SyncObj__onLeaderChanged`)."""
        me = self._self_node.id
        return me in self._members or me in self._journal.members_through(self.raftCommitIndex)

    def _gate_campaigns(self) -> None:
        """Raft thread, every tick: a node that may not campaign (joining, or
        removed for good) never does; hearing from a leader re-arms pysyncobj's
        timer, so it is pushed back each time. A removed node that campaigned would
        raise its term and depose leaders that otherwise never hear from it."""
        if not self._may_campaign():
            self._SyncObj__raftElectionDeadline = float("inf")
        elif self._SyncObj__raftElectionDeadline == float("inf"):
            self._SyncObj__raftElectionDeadline = (
                raft_clock() + self._SyncObj__generateRaftTimeout()
            )

    def change_membership(self, kind: str, node: TCPNode, timeout_s: float) -> None:
        """Leader only, any thread: append one membership change (ADD or REMOVE) and
        return once it is committed. MembershipRefused when the leader refused it
        (another change is pending, the node is already in or not in, an added node
        is not a learner of this leader); TimeoutError when it was not committed in
        time or leadership moved (it may still commit: read `members`)."""
        done = threading.Event()
        outcome: list[int] = []

        def on_done(_result: Any, error: int) -> None:
            outcome.append(error)
            done.set()

        if kind == ADD:
            self.addNodeToCluster(node, on_done)
        else:
            self.removeNodeFromCluster(node, on_done)
        self._wake()
        if not done.wait(timeout_s):
            raise TimeoutError(f"the change ({kind} {node.id}) was not committed in {timeout_s}s")
        if outcome[0] != FAIL_REASON.SUCCESS:
            reason = _FAIL_REASONS.get(outcome[0], str(outcome[0]))
            if outcome[0] == FAIL_REASON.REQUEST_DENIED:
                raise MembershipRefused(f"{kind} {node.id}: {reason}")
            # Leadership moved, or the outcome is unknown: it may still commit.
            raise TimeoutError(f"{kind} {node.id}: {reason}; it may still commit")

    def _SyncObj__onLeaderChanged(self) -> None:
        """pysyncobj counts a candidate's own vote before it asks the others (just
        before calling this). A candidate outside its latest configuration (its
        removal not committed yet) must win a majority of that configuration
        without its own vote: 0.5 makes pysyncobj's test `votes > (others + 1) / 2`
        mean `votes from others > others / 2`."""
        if self._SyncObj__raftState == 1 and not self.is_member():  # type: ignore[has-type]
            self._SyncObj__votesCount = 0.5
        SyncObj._SyncObj__onLeaderChanged(self)

    def add_learner(self, node: TCPNode) -> None:
        """Any thread, on the leader: replicate the log (and snapshots) to `node`
        without counting it toward any majority, until it is added or dropped."""
        self._learner_requests.append((ADD, node))
        self._wake()

    def drop_learner(self, address: str) -> None:
        self._learner_requests.append((REMOVE, raft_node(address)))
        self._wake()

    def learner_match(self, address: str) -> int | None:
        """Any thread: the last entry the learner at `address` holds, as the leader
        knows it (None: not a learner of this node)."""
        node = self._learners.get(address)
        if node is None:
            return None
        return int(self._SyncObj__raftMatchIndex.get(node, 0))

    def _tend_learners(self) -> None:
        """Raft thread: start and stop learners; a node that stops leading drops them
        (its successor knows nothing of them: the caller asks again there)."""
        leading = self._SyncObj__raftState == 2  # type: ignore[has-type]
        while self._learner_requests:
            kind, node = self._learner_requests.popleft()
            if kind == ADD and leading and node.id not in self._members:
                if node.id not in self._learners:
                    self._link(node)
                    self._SyncObj__readonlyNodes.add(node)
                    self._learners[node.id] = node
                    log.info("raft: replicating to learner %s", node.id)
            elif kind == REMOVE:
                self._forget_learner(node.id)
        if not leading:
            for address in list(self._learners):
                self._forget_learner(address)

    def _forget_learner(self, address: str) -> None:
        node = self._learners.pop(address, None)
        if node is None:
            return
        self._SyncObj__readonlyNodes.discard(node)
        self._unlink(node)
        log.info("raft: stopped replicating to learner %s", address)

    def _link(self, node: TCPNode) -> None:
        """Raft thread: connect to `node` and replicate to it from this log's end
        (its answers move the next index back to where its log ends)."""
        self._SyncObj__transport.addNode(node)
        self._SyncObj__raftNextIndex[node] = self._SyncObj__getCurrentLogIndex() + 1
        self._SyncObj__raftMatchIndex[node] = 0

    def _unlink(self, node: TCPNode) -> None:
        """Raft thread: stop replicating to `node` and close its link."""
        self._SyncObj__raftNextIndex.pop(node, None)
        self._SyncObj__raftMatchIndex.pop(node, None)
        self._SyncObj__connectedNodes.discard(node)
        self._SyncObj__transport.dropNode(node)

    def _wake(self) -> None:
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            notifier.notify()

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
            ROLE_NAMES.get(self._SyncObj__raftState, "?"),
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
            ROLE_NAMES.get(old, old),
            ROLE_NAMES.get(new, new),
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
        committed = max(self.raftCommitIndex, self.raftLastApplied)
        pos = stale_suffix(journal, prev_idx, prev_term, committed)
        if pos is None:
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
        self._snapshot_members = None
        SyncObj._SyncObj__loadDumpFile(self, clearJournal)
        if self._snapshot_members is not None:
            # The journal now starts at the snapshot's last entries: its
            # configuration is the base; the changes after it are in the journal.
            journal.set_base({n.id: n for n in self._snapshot_members})
            self._reconcile_members()

    # ---- leadership transfer ---------------------------------------------------------

    def request_transfer(self, to_raft_addr: str | None = None) -> None:
        """Any thread: ask the Raft loop to hand leadership to the node at
        `to_raft_addr`, or (None) to the most caught-up connected follower, with
        Raft's TimeoutNow. Best effort: pysyncobj refuses while the target lacks
        any entry of the leader's log, so the caller asks again until another node
        leads (cluster.runtime.service.ClusterService.TransferLeadership)."""
        self._transfers.append(to_raft_addr or "")
        self._wake()

    def _start_transfers(self) -> None:
        """Raft thread: pysyncobj's transferLeadership reads and sends from Raft state
        that only this thread may touch."""
        while self._transfers:
            target = self._transfers.popleft()
            if self._SyncObj__raftState == 2:  # type: ignore[has-type]
                self.transferLeadership(target or None)
                # Deposed by the target's vote request, this node refuses its vote if
                # it appended more meanwhile; pysyncobj leaves a leader's election
                # deadline long past, so it would campaign in its next tick and take
                # leadership straight back. Wait an election timeout like anyone.
                self._SyncObj__raftElectionDeadline = (
                    raft_clock() + self._SyncObj__generateRaftTimeout()
                )

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

    def journal_bytes(self) -> int:
        return self._journal.size_bytes

    def snapshot_age_s(self) -> float | None:
        """Seconds since the last snapshot was written (None: there is none)."""
        try:
            return max(0.0, time.time() - os.path.getmtime(self._path("snapshot")))
        except OSError:
            return None

    def status(self) -> RaftStatus:
        """This node's Raft state (role, term, leader, commit and applied index)."""
        return raft_status(self)

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
        # The configuration as of the snapshot's last entry, not pysyncobj's (its
        # peers now, which may hold a later change that could still be dropped).
        last_entry, prev_entry, _cluster = raft_data
        members = self._journal.members_through(last_entry[1])
        meta = pickle.dumps((last_entry, prev_entry, set(members.values())))

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
                self._snapshot_members = raft_data[2]
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


class MembershipRefused(Exception):
    """The leader did not append a membership change."""


_FAIL_REASONS = {
    value: name.lower().replace("_", " ")
    for name, value in vars(FAIL_REASON).items()
    if not name.startswith("_")
}


def _as_node(node: str | TCPNode) -> TCPNode:
    return node if isinstance(node, TCPNode) else raft_node(node)
