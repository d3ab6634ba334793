"""A node's Raft state, read from pysyncobj in this one place (its fields are
private and its `getStatus()` walks every peer, costly on every call)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FOLLOWER, CANDIDATE, LEADER = 0, 1, 2  # pysyncobj's _RAFT_STATE
ROLE_NAMES = {FOLLOWER: "follower", CANDIDATE: "candidate", LEADER: "leader"}


@dataclass(frozen=True)
class RaftStatus:
    role: int  # FOLLOWER | CANDIDATE | LEADER
    term: int
    leader: str | None  # the leader's Raft HOST:PORT, as this node knows it
    commit_index: int
    applied_index: int
    ready: bool  # caught up with the leader's commit index once since start


def raft_status(raft: Any) -> RaftStatus:
    """The status of any pysyncobj SyncObj (SagaLogRaft, or the bench's counter)."""
    return RaftStatus(
        role=role_of(raft),
        term=raft.raftCurrentTerm,
        leader=leader_address(raft),
        commit_index=raft.raftCommitIndex,
        applied_index=raft.raftLastApplied,
        ready=raft.isReady(),
    )


def role_of(raft: Any) -> int:
    """FOLLOWER, CANDIDATE or LEADER (cheaper than a status)."""
    return int(getattr(raft, "_SyncObj__raftState", FOLLOWER))


def leader_address(raft: Any) -> str | None:
    """The leader's Raft HOST:PORT as this node knows it (cheaper than a status)."""
    leader = raft._getLeader()
    return None if leader is None else str(leader.id)
