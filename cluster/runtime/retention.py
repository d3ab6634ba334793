"""Retention of ended sagas: the policy, and the leader's thread that applies it.

Policy: an ended saga keeps its records for `ended_retention_s` after its
EndSaga (NodeConfig; 0 keeps them forever). After that the leader proposes
PurgeEnded records, and every replica replaces the saga's records by a
tombstone: `Get` still answers (state, name, times, `purged: true`), `List`
still lists it, and the same Submit again is still a duplicate, not a second
run. What a purge removes is the records (the bulk: definition, payload,
outputs); the tombstone and the id's entry stay, a few dozen bytes per saga.

A purge is a replicated record because deletion must be the same on every
replica (their digests must stay equal); the cut-off time travels in the record,
so apply never reads a clock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from saga.v1 import log_pb2

from sagalog import records as rec
from sagalog.proposer import ProposeError

log = logging.getLogger(__name__)

CHECK_PERIOD_S = 1.0
# Sagas per PurgeEnded record: bounds one apply on every replica's Raft thread
# (about 0.1 ms a saga), well inside the apply budget.
SAGAS_PER_PURGE = 200
# PurgeEnded records per check: at most 20 x 200 = 4,000 sagas a second, more
# than the cluster can end, so the backlog of a long pause drains.
MAX_PURGES_PER_CHECK = 20


def purge_cutoff(oldest_ended_ms: int | None, now_ms: int, retention_s: float) -> int | None:
    """The PurgeEnded cut-off due now, or None when nothing is old enough."""
    if retention_s <= 0 or oldest_ended_ms is None:
        return None
    cutoff = now_ms - int(retention_s * 1000)
    return cutoff if oldest_ended_ms < cutoff else None


class Retention:
    """Runs on every node; acts only while `in_office()`."""

    def __init__(
        self,
        retention_s: float,
        in_office: Callable[[], bool],
        oldest_ended_ms: Callable[[], int | None],
        propose: Callable[[log_pb2.Record], log_pb2.RecordResult],
    ) -> None:
        self.retention_s = retention_s
        self._in_office = in_office
        self._oldest_ended_ms = oldest_ended_ms
        self._propose = propose
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retention", daemon=True)
        self.purged = 0  # sagas purged by this node's proposals (a metric)

    def start(self) -> None:
        if self.retention_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stopping.wait(CHECK_PERIOD_S):
            try:
                self.check()
            except ProposeError as exc:
                log.debug("purge proposal failed, will retry: %s", exc)
            except Exception:
                log.exception("retention check failed; retrying")

    def check(self) -> int:
        """Propose what is due, in bounded records; returns the sagas purged."""
        purged = 0
        for _ in range(MAX_PURGES_PER_CHECK):
            if not self._in_office() or self._stopping.is_set():
                break
            now_ms = int(time.time() * 1000)
            cutoff = purge_cutoff(self._oldest_ended_ms(), now_ms, self.retention_s)
            if cutoff is None:
                break
            result = self._propose(rec.purge_ended(cutoff, SAGAS_PER_PURGE, now_ms))
            if result.verdict != log_pb2.ACCEPTED:
                log.error("PurgeEnded refused: %s", result.reason)
                break
            purged += result.purged
            if result.purged < SAGAS_PER_PURGE:
                break
        if purged:
            self.purged += purged
            log.info("retention: purged %d ended sagas", purged)
        return purged
