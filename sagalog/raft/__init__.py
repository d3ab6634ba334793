"""The Saga Log as a pysyncobj state machine: the IO edge between Raft and SagaLog.

Modules: `replica` (SagaLogRaft: the state machine and its overrides of pysyncobj),
`timing` (timers and the pysyncobj configuration), `transport` (durable, capped and
keepalive TCP links), `matching` (Raft's log-matching rule as pure functions),
`status` (a node's Raft state, read in one place), `linkfaults` (a testing aid).

What this package adds to pysyncobj, and why:

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

from pysyncobj.monotonic import monotonic as raft_clock  # not time.monotonic's clock

from sagalog.raft.linkfaults import LinkFaults
from sagalog.raft.matching import align_append_entries, stale_suffix
from sagalog.raft.replica import (
    EXIT_STORAGE_FAILURE,
    MembershipRefused,
    SagaLogRaft,
    durable_journal,
    fail_stop,
)
from sagalog.raft.status import RaftStatus, leader_address, raft_status, role_of
from sagalog.raft.timing import RaftTiming, raft_conf
from sagalog.raft.transport import SyncingTransport

__all__ = [
    "EXIT_STORAGE_FAILURE",
    "LinkFaults",
    "MembershipRefused",
    "RaftStatus",
    "RaftTiming",
    "SagaLogRaft",
    "SyncingTransport",
    "align_append_entries",
    "durable_journal",
    "fail_stop",
    "leader_address",
    "raft_clock",
    "raft_conf",
    "raft_status",
    "role_of",
    "stale_suffix",
]
