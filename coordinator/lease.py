"""May the coordinator act for its epoch now? The permission checked before every
participant call and every proposal.

In office, and a majority answered recently (the lease). The lease alone is fooled
by a pause (SIGSTOP, a long GC or swap): on resuming, the Raft thread may first read
answers that were queued during the pause, which look fresh. So a gap in the
driver's own clock readings longer than the lease withdraws the permission until a
commit (an empty entry, the barrier) proves that no newer leader exists.

No IO and no clock of its own: the clock, the Raft checks and the way to send a
barrier are given, so tests drive time.
"""

from __future__ import annotations

from collections.abc import Callable

BARRIER_RETRY_S = 3.0  # a barrier without an answer by then is sent again


class Lease:
    def __init__(
        self,
        lease_s: float,
        clock: Callable[[], float],
        send_barrier: Callable[[int], None],
        majority_heard_within: Callable[[float], bool] | None = None,
        in_office: Callable[[], bool] | None = None,
    ) -> None:
        """`send_barrier(pauses)` commits an empty entry and, when it is answered,
        calls `on_barrier(ok, pauses)` (from the driver's thread)."""
        self.lease_s = lease_s
        self._clock = clock
        self._send_barrier = send_barrier
        self._majority_heard_within = majority_heard_within
        self._in_office = in_office
        self._last_seen = clock()
        self._confirmed = True  # the node just committed its Epoch
        # Pauses detected so far. Only a barrier sent after the latest one counts:
        # one that committed before a pause proves nothing after it.
        self.pauses = 0
        self._barrier: tuple[float, int] | None = None  # (sent at, pauses) in flight

    def may_act(self) -> bool:
        self.read_clock()
        if not self._confirmed:
            self._confirm()
            return False
        if self._in_office is not None and not self._in_office():
            return False
        check = self._majority_heard_within
        return check is None or bool(check(self.lease_s))

    def read_clock(self) -> None:
        """Note a reading of the clock: a gap since the last one longer than the
        lease is a pause, and withdraws the permission to act."""
        now = self._clock()
        if now - self._last_seen > self.lease_s:
            self._confirmed = False
            self.pauses += 1
        self._last_seen = now

    def waited(self, now: float, wait_s: float) -> None:
        """The driver waited up to `wait_s` for events: waiting is not a pause;
        anything longer than the wait is."""
        if now - self._last_seen <= wait_s + self.lease_s:
            self._last_seen = now

    def paused_since_checked(self) -> bool:
        """A gap longer than the lease since the last reading: the caller was paused
        after `may_act` and must ask again."""
        return self._clock() - self._last_seen > self.lease_s

    def on_barrier(self, ok: bool, pauses: int) -> None:
        if pauses == self.pauses:
            self._barrier = None
            self._confirmed = ok

    def _confirm(self) -> None:
        now = self._clock()
        if self._barrier is not None:
            sent_at, sent_after = self._barrier
            if sent_after == self.pauses and now - sent_at < BARRIER_RETRY_S:
                return
        self._barrier = (now, self.pauses)
        self._send_barrier(self.pauses)
