"""The coordinator's driver: the IO around `coordinator.scheduler`, on the leader only.

One thread, one event queue, no thread per saga. Events are: records applied by
the Saga Log (the listener hook), participant replies (from the transport,
`coordinator.calls`), proposal outcomes (pysyncobj callbacks), and barrier commits
for the lease. Each loop turn hands the events to the scheduler with the time, reads
from the store what it asks for, and carries out what it decided: one Raft entry per
turn's records, the participant calls, and the wait until the next timer. It stops at
once when told (leadership lost) and ignores whatever arrives afterwards.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from pysyncobj import FAIL_REASON
from saga.v1 import log_pb2

from coordinator import core
from coordinator.calls import ParticipantCalls, ParticipantTransport
from coordinator.lease import Lease
from coordinator.scheduler import CallOrder, Scheduler
from coordinator.view import SagaView
from sagalog import codec

log = logging.getLogger(__name__)

TURN_WAIT_S = 0.05  # longest idle wait for an event


class Driver:
    """Drives every in-flight saga while this node is in office under `epoch`.

    `raft` needs `apply_batch(bytes, callback=...)` and `reading()`; `participants`
    is the transport (`coordinator.calls`; gRPC by default). The clocks are inputs,
    so tests drive time: `now_ms` stamps records, `monotonic` measures waits. Without
    `start`, a test steps the loop itself: `on_applied` and answers queue events,
    `step` runs one turn."""

    def __init__(
        self,
        raft: Any,
        epoch: int,
        node_id: str,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        on_fenced: Callable[[], None] | None = None,
        lease_s: float = 0.2,
        in_office: Callable[[], bool] | None = None,
        participants: ParticipantTransport | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        turn_wait_s: float = TURN_WAIT_S,
        observe_commit: Callable[[float], None] | None = None,
    ) -> None:
        """`observe_commit` gets each proposal's seconds from proposing to applied."""
        self._raft = raft
        self._observe_commit = observe_commit
        self._participants = participants if participants is not None else ParticipantCalls()
        self._monotonic = monotonic
        self._turn_wait_s = turn_wait_s  # 0 in tests that step turns by hand
        self.lease = Lease(
            lease_s,
            monotonic,
            self._send_barrier,
            getattr(raft, "majority_heard_within", None),
            in_office,
        )
        self.epoch = epoch
        self.node_id = node_id
        self._now_ms = now_ms
        self._on_fenced = on_fenced
        self.scheduler = Scheduler(epoch, now_ms(), monotonic())
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._event_lag_s = 0.0  # see lag_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"driver-{epoch}", daemon=True)
        # (since when, adopted, to read): the in-flight sagas this term picks up, logged
        # once all are loaded and re-planned (what a failover costs after the election).
        self._resuming: tuple[float, int, int] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def adopt(self, views: dict[str, SagaView]) -> None:
        """Take in-flight sagas already folded (`coordinator.standby`), so that they
        need not be read from the store. Before `start` only."""
        assert not self._thread.is_alive(), "adopt before start"
        self.scheduler.adopt(views)

    def start(self) -> None:
        log.info("driver starts in epoch %d", self.epoch)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._post(("wake",))
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        self._participants.close()
        log.info("driver of epoch %d stopped", self.epoch)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    @property
    def stats(self) -> dict[str, int]:
        return self.scheduler.stats

    def in_flight(self) -> int:
        return len(self.scheduler.runs)

    def saga_limit(self) -> int:
        return self.scheduler.admission.limit

    def lag_s(self) -> float:
        """How far behind the coordinator is: the longest an event (a reply, an
        applied record) waited in the last turn, or the age of the oldest record
        waiting to be proposed. Submit refuses new sagas while it is high."""
        since = self.scheduler.outbox_since()  # from gRPC threads: a racy read is fine
        outbox_age = 0.0 if since is None else self._monotonic() - since
        return max(self._event_lag_s, outbox_age)

    def _post(self, event: tuple) -> None:
        self._events.put((self._monotonic(), event))

    # ---- inputs (any thread) ---------------------------------------------------------

    def on_applied(self, records: list[tuple[str, int, log_pb2.Record]]) -> None:
        """The Saga Log's listener: runs on the Raft thread, so it only enqueues."""
        if not self._stop.is_set():
            self._post(("applied", records))

    # ---- the loop --------------------------------------------------------------------

    def step(self) -> None:
        """One turn of the loop on the caller's thread (tests; never with `start`)."""
        assert not self._thread.is_alive(), "the driver runs its own loop"
        self._turn()

    def _loop(self) -> None:
        try:
            started = self._monotonic()
            self._sweep()
            self._resuming = (started, len(self.scheduler.runs), self.scheduler.loads_waiting())
            while not self._stop.is_set():
                self._turn()
        except Exception:
            log.exception("driver failed; it will be restarted by the node")
            self._stop.set()

    def _turn(self) -> None:
        scheduler = self.scheduler
        timeout = scheduler.wait_s(self._monotonic(), self._turn_wait_s)
        lag = 0.0
        try:
            posted, event = self._events.get(timeout=timeout)
            lag = self._monotonic() - posted  # the oldest event of this turn
            self._handle(event)
            while True:  # drain: everything that arrived goes into this turn
                self._handle(self._events.get_nowait()[1])
        except queue.Empty:
            pass
        self._event_lag_s = lag
        if self._stop.is_set():
            return
        now = self._monotonic()
        self.lease.waited(now, timeout)
        scheduler.tick(now, self._now_ms(), self.lease.may_act)
        if now >= scheduler.next_sweep:
            self._sweep()
        for saga_id in scheduler.loads():
            self._load(saga_id)
            # 500 loads took 250 ms here: longer than the lease, so without a
            # reading of the clock between them the turn looked like a pause
            # and every call waited for a confirmation commit (see Lease).
            self.lease.read_clock()
        scheduler.advance(self._monotonic(), self._now_ms(), self.lease.may_act)
        self._send(scheduler.take_orders())
        self._flush()
        if self._resuming is not None and scheduler.resumed():
            since, warm, loaded = self._resuming
            self._resuming = None
            log.info(
                "epoch %d picked up %d in-flight sagas (%d from the standby, %d read from "
                "the store) in %.0f ms; %d calls started",
                self.epoch,
                warm + loaded,
                warm,
                loaded,
                (self._monotonic() - since) * 1000,
                self.stats["calls"],
            )

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "applied":
            for saga_id, seq, record in event[1]:
                if not self.scheduler.applied(saga_id, seq, record):
                    self._load(saga_id)  # unknown here, or a gap
        elif kind == "reply":
            _, saga_id, call, reply, endpoint = event
            now = self._monotonic()
            self.scheduler.replied(saga_id, call, reply, endpoint, now, self._now_ms())
        elif kind == "proposed":
            self._proposed(event[1], event[2])
        elif kind == "barrier":
            self.lease.on_barrier(event[1] == FAIL_REASON.SUCCESS, event[2])

    # ---- IO: the store -----------------------------------------------------------------

    def _load(self, saga_id: str) -> None:
        with self._raft.reading() as saga_log:
            records = saga_log.records(saga_id)
        self.scheduler.loaded(saga_id, records)

    def _sweep(self) -> None:
        with self._raft.reading() as saga_log:
            in_flight = set(saga_log.in_flight())
        for saga_id in self.scheduler.swept(in_flight, self._monotonic()):
            self._load(saga_id)  # ended in the store, not in its view (a stale adopted one)

    # ---- IO: proposals -----------------------------------------------------------------

    def _flush(self) -> None:
        for proposal in self.scheduler.proposals(self._monotonic(), self.lease.may_act):

            def done(
                result: Any, reason: int, pid: int = proposal.pid, sent: float = time.monotonic()
            ) -> None:
                if self._observe_commit is not None and result is not None:
                    self._observe_commit(time.monotonic() - sent)
                self._post(("proposed", pid, result))

            self._raft.apply_batch(codec.encode_batch(proposal.records), callback=done)

    def _proposed(self, pid: int, result: Any) -> None:
        results = None
        if result is not None:
            parsed = log_pb2.BatchResult()
            parsed.ParseFromString(result)
            results = list(parsed.results)
        if self.scheduler.proposed(pid, results):
            log.warning("epoch %d was fenced by a newer leader: stopping", self.epoch)
            self._stop.set()
            if self._on_fenced is not None:
                self._on_fenced()

    def _send_barrier(self, pauses: int) -> None:
        """Commit an empty entry for the lease (see coordinator.lease)."""

        def done(result: Any, reason: int) -> None:
            self._post(("barrier", reason, pauses))

        self._raft.apply_batch(codec.encode_batch([]), callback=done)

    # ---- IO: participant calls ---------------------------------------------------------

    def _send(self, orders: list[CallOrder]) -> None:
        """Send each order if this epoch may act at this moment: the turn may have run
        long (loads, sweeps, planning) or paused since the scheduler ordered it."""
        for order in orders:
            if not self.lease.may_act():
                self.scheduler.not_sent(order)
                continue
            # Lets a checker tell sent-late from delivered-late.
            order.request.sent_unix_ms = self._now_ms()
            if self.lease.paused_since_checked():
                # Paused between `may_act` and the stamp: the stamp may postdate a
                # newer leader's first call. Ask again later (`may_act` sees the gap).
                self.scheduler.not_sent(order)
                continue
            self._participants.send(
                order.endpoint,
                order.request,
                order.call.compensation,
                order.timeout_s,
                self._answer(order.saga_id, order.call, order.endpoint),
            )

    def _answer(self, saga_id: str, call: core.Call, endpoint: str) -> Callable[..., None]:
        def answer(reply: core.Reply) -> None:
            self._post(("reply", saga_id, call, reply, endpoint))

        return answer
