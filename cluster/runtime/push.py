"""Completion by push: each applied record wakes whoever waits on its saga.

The Raft thread applies entries; `AppliedFeed.publish` (the Saga Log's listener)
hands each applied entry's records to the gRPC server's event loop with one
thread-safe call per entry, and the loop gives each record to the subscriptions
of its saga. No one polls, and no store lock is held while anyone waits.

A subscription is a bounded buffer. A reader slower than its saga's records
(a Watch stream whose client does not read) fills it; the subscription then
drops what it holds and says so (`fell_behind`), and the reader re-reads from the
store from the last sequence number it delivered. A snapshot installed from the
leader replaces the store without applying records one by one: every
subscription is told to re-read (`reset`).

The order that makes this lossless: subscribe first, then read the store. A
record applied before the read is in the store; one applied after it is
delivered to the subscription (a record can arrive both ways: readers skip
sequence numbers they already have).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from typing import Any

from saga.v1 import log_pb2

# Records one subscription holds for a reader that has not taken them yet. A
# travel saga has about a dozen; past this the reader re-reads from the store.
MAX_BUFFERED_RECORDS = 256


class Subscription:
    """One reader's view of one saga's applied records. Loop thread only."""

    def __init__(self, saga_id: str) -> None:
        self.saga_id = saga_id
        self._records: collections.deque[tuple[int, log_pb2.Record]] = collections.deque()
        self._wake = asyncio.Event()
        self.fell_behind = False  # records were dropped: re-read from the store

    def offer(self, seq: int, record: log_pb2.Record) -> None:
        if not self.fell_behind:
            if len(self._records) < MAX_BUFFERED_RECORDS:
                self._records.append((seq, record))
            else:
                self.mark_behind()
        self._wake.set()

    def mark_behind(self) -> None:
        self.fell_behind = True
        self._records.clear()
        self._wake.set()

    def take(self) -> tuple[list[tuple[int, log_pb2.Record]], bool]:
        """Everything buffered (seq, record), oldest first, and whether records were
        dropped before it (then re-read from the store). Empties the buffer."""
        out, fell_behind = list(self._records), self.fell_behind
        self._records.clear()
        self.fell_behind = False
        self._wake.clear()
        return out, fell_behind

    async def wait(self, timeout_s: float) -> None:
        """Until something is offered (or the subscription fell behind), or timeout."""
        if self._records or self.fell_behind:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        except TimeoutError:
            pass


class AppliedFeed:
    """Subscriptions per saga, fed from the Raft thread through the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._by_saga: dict[str, set[Subscription]] = {}
        self.subscriptions = 0

    # ---- the loop thread -------------------------------------------------------------

    def subscribe(self, saga_id: str) -> Subscription:
        sub = Subscription(saga_id)
        self._by_saga.setdefault(saga_id, set()).add(sub)
        self.subscriptions += 1
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        subs = self._by_saga.get(sub.saga_id)
        if subs is not None and sub in subs:
            subs.discard(sub)
            self.subscriptions -= 1
            if not subs:
                del self._by_saga[sub.saga_id]

    def _deliver(self, records: Sequence[tuple[str, int, log_pb2.Record]]) -> None:
        for saga_id, seq, record in records:
            for sub in self._by_saga.get(saga_id, ()):
                sub.offer(seq, record)

    def _reset_all(self) -> None:
        for subs in self._by_saga.values():
            for sub in subs:
                sub.mark_behind()

    # ---- any thread (the Raft thread) ------------------------------------------------

    def publish(self, records: Sequence[tuple[str, int, log_pb2.Record]]) -> None:
        """The Saga Log's listener: one entry's accepted records. Never blocks.

        Reading `_by_saga` here without the loop is safe: a saga that gains its
        first subscriber after this check reads the store after this entry was
        written there."""
        if self._by_saga:
            self._call_soon(self._deliver, records)

    def reset(self) -> None:
        """The store was replaced (a snapshot installed): every reader re-reads."""
        if self._by_saga:
            self._call_soon(self._reset_all)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: the node is stopping, no one is listening
