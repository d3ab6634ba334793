"""Raft timers and the pysyncobj configuration built from them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from pysyncobj import SyncObjConf

from sagalog.codec import MAX_BATCH_BYTES


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
        # Membership changes are entries (Cluster.AddNode/RemoveNode); SagaLogRaft
        # computes the configuration from its log instead of following pysyncobj's
        # changes one by one (sagalog.membership).
        dynamicMembershipChange=True,
        **hooks,
    )
