"""ReadIndex: linearizable reads without a log entry per read (Raft thesis 6.4).

A leader answers a read from its own store only once it knows that it still
led when the read arrived. The read notes the commit index at that moment (its
*read index*) and the *round* it waits for: the next number that the leader will
tag its AppendEntries with. Each follower echoes the round of the AppendEntries
it is answering. Once a majority of the configured voters (the leader included)
has answered a round at least as high, no newer leader can have committed
anything before the read arrived: a newer leader needs a majority that moved to
a higher term, and a node that moved to a higher term ignores the old leader's
AppendEntries instead of answering them. The leader then waits until it has
applied the read index and answers.

Rounds replace time. An answer that was sent before the read arrived (say,
buffered while the leader was paused by SIGSTOP) carries an older round and
confirms nothing, so no clock assumption is needed. Every read that arrives
while a round is being confirmed shares the next one: one heartbeat round per
batch of reads, never one per read.

Thread-safety: `request` from any thread; everything else on the Raft thread.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable


class ReadRefused(Exception):
    """The read cannot be confirmed here: this node stopped leading (or never did)."""


class PendingRead:
    """One read waiting for its round; `wait` gives its read index."""

    def __init__(self, round_: int, index: int, term: int) -> None:
        self.round = round_
        self.index = index  # the commit index when the read arrived
        self.term = term  # the leader's term then; confirmed only in that term
        self._done = threading.Event()
        self._error = ""

    def confirm(self) -> None:
        self._done.set()

    def refuse(self, reason: str) -> None:
        self._error = reason
        self._done.set()

    def wait(self, timeout_s: float) -> int:
        """The read index once confirmed. ReadRefused if refused; TimeoutError."""
        if not self._done.wait(timeout_s):
            raise TimeoutError(f"leadership not confirmed within {timeout_s:.3f}s")
        if self._error:
            raise ReadRefused(self._error)
        return self.index


class ReadRounds:
    """Rounds of leadership confirmation, shared by every read waiting on one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # invariant: every AppendEntries sent from now on carries `sent`; a read
        # registered now waits for round `sent + 1`, so only answers to messages
        # sent after it arrived can confirm it.
        self.sent = 0
        self._answered: dict[Hashable, int] = {}  # voter -> highest round it echoed
        self._waiting: list[PendingRead] = []

    def request(self, commit_index: int, term: int) -> PendingRead:
        """Any thread: a read arriving now, at this leader's commit index and term."""
        with self._lock:
            read = PendingRead(self.sent + 1, commit_index, term)
            self._waiting.append(read)
            return read

    def round_wanted(self) -> bool:
        """Raft thread: does a waiting read need a round not yet started?"""
        with self._lock:
            return any(r.round > self.sent for r in self._waiting)

    def start_round(self) -> int:
        """Raft thread, just before it sends AppendEntries to every peer."""
        with self._lock:
            self.sent += 1
            return self.sent

    def answered(self, voter: Hashable, round_: int, voters: Iterable[Hashable], term: int) -> None:
        """Raft thread, leader: `voter` answered an AppendEntries tagged `round_`."""
        with self._lock:
            if round_ <= self._answered.get(voter, 0):
                return
            self._answered[voter] = round_
            if not self._waiting:
                return
            rounds = sorted((self._answered.get(v, 0) for v in voters), reverse=True)
            # The leader counts itself: a majority of n = len(rounds) + 1 voters
            # needs n // 2 answers from the others.
            need = (len(rounds) + 1) // 2
            confirmed = rounds[need - 1] if need else self.sent
            still = []
            for read in self._waiting:
                if read.term != term:
                    read.refuse(f"the term changed from {read.term} to {term}")
                elif read.round <= confirmed:
                    read.confirm()
                else:
                    still.append(read)
            self._waiting = still

    def refuse_all(self, reason: str) -> None:
        """Raft thread: this node is no longer leader (or changed term)."""
        with self._lock:
            for read in self._waiting:
                read.refuse(reason)
            self._waiting = []

    def refuse_other_terms(self, term: int, reason: str) -> None:
        with self._lock:
            keep = []
            for read in self._waiting:
                if read.term != term:
                    read.refuse(reason)
                else:
                    keep.append(read)
            self._waiting = keep
