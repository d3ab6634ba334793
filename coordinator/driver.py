"""The coordinator's driver: the IO around `coordinator.core`, on the leader only.

One thread, one event queue, no thread per saga. Events are: records applied by
the Saga Log (the listener hook), participant replies (from `coordinator.calls`,
on an event loop), proposal outcomes (pysyncobj callbacks), and timers (retry
backoff). Each loop turn folds the events into per-saga views, asks the core what
to do, sends every record decided in that turn as one Raft entry (group commit
without a fixed wait: under load a turn collects many sagas' records; what follows
a proposed record, such as the StartT an EndT unblocks, joins it), and starts the
participant calls the applied log says must be outstanding.

The driver acts on applied records, not on proposal callbacks: a lost callback
only clears a "pending" mark after its deadline, and the next plan proposes the
record again (the log answers DUPLICATE if it was applied). A periodic sweep of
the in-flight index re-plans every saga, so nothing is stranded. It stops at once
when told (leadership lost) and ignores whatever arrives afterwards.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pysyncobj import FAIL_REASON
from saga.v1 import log_pb2

from coordinator import core
from coordinator.admission import AdmissionLimit
from coordinator.calls import ParticipantCalls, ParticipantTransport
from coordinator.lease import Lease
from coordinator.view import SagaView
from sagalog import codec
from sagalog.transitions import Phase

log = logging.getLogger(__name__)

MAX_RECORDS_PER_PROPOSAL = 512  # below codec.MAX_RECORDS_PER_BATCH
MAX_PROPOSAL_BYTES = 4 * 1024 * 1024  # below codec.MAX_BATCH_BYTES
MAX_PROPOSALS_IN_FLIGHT = 64
PROPOSAL_DEADLINE_S = 3.0
MAX_CALLS_IN_FLIGHT = 10_000
# Calls to one participant endpoint at once: one that never answers holds at most
# this share of MAX_CALLS_IN_FLIGHT (until its calls time out), not every saga's.
MAX_CALLS_PER_ENDPOINT = 1_000
SWEEP_INTERVAL_S = 1.0  # at most this often; longer with many sagas in flight
SWEEP_SAGAS_PER_S = 20_000  # the sweep reads the in-flight index: spread its cost
# Sagas re-planned per loop turn: a new leader with 100,000 sagas to resume still
# handles replies and applied records between slices.
MAX_ADVANCE_PER_TURN = 1_000
# Sagas read from the store per turn when a new leader picks up the in-flight ones:
# loading 100,000 at once starved the Raft thread and cost the leadership.
MAX_LOADS_PER_TURN = 500
TURN_WAIT_S = 0.05  # longest idle wait for an event


@dataclass
class _Run:
    view: SagaView
    calls: set[core.Call] = field(default_factory=set)  # outstanding participant calls
    waiting: set[core.Call] = field(default_factory=set)  # failed calls awaiting a retry
    # Records proposed and not applied yet, by identity, in the order they were
    # proposed: the plan decides what follows them without waiting for their commit.
    pending: dict[tuple, log_pb2.Record] = field(default_factory=dict)


def _take(queue: OrderedDict[str, None], limit: int) -> list[str]:
    """Remove and return up to `limit` saga ids from the front of `queue`."""
    return [queue.popitem(last=False)[0] for _ in range(min(len(queue), limit))]


def _identity(record: log_pb2.Record) -> tuple:
    identity = codec.identity(record)
    assert identity is not None, "the driver sees saga records only"
    return (record.saga_id, *identity)


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
    ) -> None:
        self._raft = raft
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
        self._events: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._runs: dict[str, _Run] = {}
        # Sagas to re-plan, oldest first: only these are looked at in a turn.
        self._dirty: OrderedDict[str, None] = OrderedDict()
        self._backlog = False  # more work than one turn does: no idle wait
        self._to_load: OrderedDict[str, None] = OrderedDict()  # in flight, not read yet
        # Sagas with a call to make that had to wait (no call budget, or no permission
        # to act): re-planned when budget frees up and the driver may act, not every
        # turn (with 10,000 calls out to a hung participant that was a busy loop).
        self._blocked: OrderedDict[str, None] = OrderedDict()
        self._timers: list[tuple[float, int, str, core.Call]] = []
        self._timer_seq = 0
        self._proposals: dict[int, tuple[float, list[tuple]]] = {}
        self._proposal_seq = 0
        # (record, its identity, when it was queued), oldest first
        self._outbox: list[tuple[log_pb2.Record, tuple, float]] = []
        self._event_lag_s = 0.0  # see lag_s
        self._calls_in_flight = 0
        self._calls_to: Counter[str] = Counter()  # calls in flight by endpoint
        # Sagas waiting for a call slot of one endpoint, woken by its replies.
        self._blocked_on: dict[str, OrderedDict[str, None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"driver-{epoch}", daemon=True)
        self._next_sweep = 0.0
        # (since when, adopted, to read): the in-flight sagas this term picks up, logged
        # once all are loaded and re-planned (what a failover costs after the election).
        self._resuming: tuple[float, int, int] | None = None
        self.stats = {"proposals": 0, "records": 0, "calls": 0, "replies": 0}
        # How many sagas may be in flight (Submit asks), from the latency of the
        # sagas started in this driver's term (older ones' latency holds the failover).
        self.admission = AdmissionLimit(monotonic())
        self._started_ms = now_ms()

    # ---- lifecycle -------------------------------------------------------------------

    def adopt(self, views: dict[str, SagaView]) -> None:
        """Take in-flight sagas already folded (`coordinator.standby`), so that they
        need not be read from the store. Before `start` only."""
        assert not self._thread.is_alive(), "adopt before start"
        for saga_id, view in views.items():
            if view.phase in (Phase.RUNNING, Phase.ABORTING):
                self._runs[saga_id] = _Run(view)
                self._touch(saga_id)

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

    def in_flight(self) -> int:
        return len(self._runs)

    def saga_limit(self) -> int:
        return self.admission.limit

    def lag_s(self) -> float:
        """How far behind the coordinator is: the longest an event (a reply, an
        applied record) waited in the last turn, or the age of the oldest record
        waiting to be proposed. Submit refuses new sagas while it is high."""
        try:  # read from gRPC threads while the driver's thread changes the outbox
            outbox_age = self._monotonic() - self._outbox[0][2]
        except IndexError:
            outbox_age = 0.0
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
            self._resuming = (started, len(self._runs), len(self._to_load))
            while not self._stop.is_set():
                self._turn()
        except Exception:
            log.exception("driver failed; it will be restarted by the node")
            self._stop.set()

    def _turn(self) -> None:
        timeout = 0.0 if self._backlog else self._turn_wait_s
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - self._monotonic()))
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
        while self._timers and self._timers[0][0] <= now:
            _, _, saga_id, call = heapq.heappop(self._timers)
            self._retry(saga_id, call)
        self._expire_proposals(now)
        self.admission.update(now, len(self._runs))
        if now >= self._next_sweep:
            self._sweep()
        self._unblock()
        for saga_id in _take(self._to_load, MAX_LOADS_PER_TURN):
            if saga_id not in self._runs:
                self._load(saga_id)
                # 500 loads took 250 ms here: longer than the lease, so without a
                # reading of the clock between them the turn looked like a pause
                # and every call waited for a confirmation commit (see Lease).
                self.lease.read_clock()
        now_ms = self._now_ms()
        self._backlog = bool(self._to_load) or len(self._dirty) > MAX_ADVANCE_PER_TURN
        for saga_id in _take(self._dirty, MAX_ADVANCE_PER_TURN):
            run = self._runs.get(saga_id)
            if run is not None:
                self._advance(saga_id, run, now_ms)
        self._flush()
        if self._resuming is not None and not self._to_load and not self._backlog:
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
                self._apply(saga_id, seq, record)
        elif kind == "reply":
            self._reply(event[1], event[2], event[3], event[4])
        elif kind == "proposed":
            self._proposed(event[1], event[2], event[3])
        elif kind == "barrier":
            self.lease.on_barrier(event[1] == FAIL_REASON.SUCCESS, event[2])

    # ---- folding the log -------------------------------------------------------------

    def _apply(self, saga_id: str, seq: int, record: log_pb2.Record) -> None:
        run = self._runs.get(saga_id)
        if run is None:
            self._load(saga_id)
            return
        run.pending.pop(_identity(record), None)
        if seq == run.view.next_seq:
            run.view.add(record)
            if record.HasField("end_saga"):
                view = run.view
                fresh = view.started_ms >= self._started_ms  # started in this term
                self.admission.on_ended((view.ended_ms - view.started_ms) / 1000 if fresh else None)
        elif seq > run.view.next_seq:  # a gap: read the saga again from the store
            self._load(saga_id)
            return
        self._touch(saga_id)

    def _load(self, saga_id: str) -> None:
        with self._raft.reading() as saga_log:
            records = saga_log.records(saga_id)
        view = SagaView.from_records(saga_id, records)
        if view.phase in (Phase.RUNNING, Phase.ABORTING):
            old = self._runs.get(saga_id)
            run = _Run(view)
            if old is not None:  # keep what is outstanding
                run.calls, run.waiting, run.pending = old.calls, old.waiting, old.pending
            self._runs[saga_id] = run
            self._touch(saga_id)
        else:
            self._runs.pop(saga_id, None)

    def _touch(self, saga_id: str) -> None:
        """Re-plan this saga in a coming turn."""
        self._dirty[saga_id] = None

    def _unblock(self) -> None:
        free = MAX_CALLS_IN_FLIGHT - self._calls_in_flight
        if not self._blocked or free <= 0 or not self.lease.may_act():
            return
        for saga_id in _take(self._blocked, free):
            self._touch(saga_id)

    def _sweep(self) -> None:
        """The safety net: pick up in-flight sagas the events did not bring, and
        re-plan every saga that waits on nothing (no call, retry timer or proposal
        outstanding), which only a lost event can leave behind."""
        with self._raft.reading() as saga_log:
            in_flight = set(saga_log.in_flight())
        interval = max(SWEEP_INTERVAL_S, len(in_flight) / SWEEP_SAGAS_PER_S)
        self._next_sweep = self._monotonic() + interval
        for saga_id in in_flight - self._runs.keys():
            self._to_load[saga_id] = None
        for saga_id, run in list(self._runs.items()):
            if saga_id not in in_flight:
                if run.view.phase is Phase.ENDED:
                    del self._runs[saga_id]
                else:  # ended in the store, not in this view (a stale adopted one)
                    self._load(saga_id)
            elif not (run.calls or run.waiting or run.pending):
                self._touch(saga_id)

    # ---- deciding --------------------------------------------------------------------

    def _advance(self, saga_id: str, run: _Run, now_ms: int) -> None:
        if run.view.phase is Phase.ENDED:
            self._runs.pop(saga_id, None)
            return
        plan = core.plan_ahead(run.view, list(run.pending.values()), self.epoch, now_ms)
        self._propose(run, plan.records)
        for call in plan.calls:
            if call not in run.calls and call not in run.waiting:
                self._call(run, call)

    def _propose(self, run: _Run, records: list[log_pb2.Record]) -> None:
        for record in records:
            identity = _identity(record)
            if identity not in run.pending:
                run.pending[identity] = record
                self._outbox.append((record, identity, self._monotonic()))

    def _reply(self, saga_id: str, call: core.Call, reply: core.Reply, endpoint: str) -> None:
        self._calls_in_flight -= 1
        self._calls_to[endpoint] -= 1
        if self._calls_to[endpoint] <= 0:
            del self._calls_to[endpoint]  # endpoints come from clients: keep no zeros
        waiting = self._blocked_on.get(endpoint)
        if waiting:
            for blocked in _take(waiting, MAX_CALLS_PER_ENDPOINT - self._calls_to[endpoint]):
                self._touch(blocked)
            if not waiting:
                del self._blocked_on[endpoint]
        self.stats["replies"] += 1
        run = self._runs.get(saga_id)
        if run is None:
            return
        run.calls.discard(call)
        response = core.on_reply(run.view, call, reply, self.epoch, self._now_ms())
        self._propose(run, response.records)
        if response.retry_after_ms is not None:
            run.waiting.add(call)
            self._timer_seq += 1
            due = self._monotonic() + response.retry_after_ms / 1000
            heapq.heappush(self._timers, (due, self._timer_seq, saga_id, call))
        else:
            # Re-plan in this turn: what follows the reply's records (the StartT they
            # unblock, EndSaga) joins them in this turn's entry; a stale or ignored
            # reply is re-planned too.
            self._touch(saga_id)

    def _retry(self, saga_id: str, call: core.Call) -> None:
        run = self._runs.get(saga_id)
        if run is None:
            return
        run.waiting.discard(call)
        records = core.retry(run.view, call, self.epoch, self._now_ms())
        if records is None:
            self._touch(saga_id)
        elif records:
            self._propose(run, records)
        else:
            self._call(run, call)

    # ---- IO: proposals ---------------------------------------------------------------

    def _flush(self) -> None:
        if self._outbox and not self.lease.may_act():
            return  # kept; proposed once in office again, or dropped when stopped
        while self._outbox and len(self._proposals) < MAX_PROPOSALS_IN_FLIGHT:
            count, size = 0, 0
            for record, _, _ in self._outbox[:MAX_RECORDS_PER_PROPOSAL]:
                size += record.ByteSize() + 8
                if count and size > MAX_PROPOSAL_BYTES:
                    break
                count += 1
            batch = [record for record, _, _ in self._outbox[:count]]
            identities = [identity for _, identity, _ in self._outbox[:count]]
            del self._outbox[:count]
            self._proposal_seq += 1
            pid = self._proposal_seq
            self._proposals[pid] = (self._monotonic() + PROPOSAL_DEADLINE_S, identities)
            self.stats["proposals"] += 1
            self.stats["records"] += len(batch)

            def done(result: Any, reason: int, pid: int = pid, batch=batch) -> None:
                self._post(("proposed", pid, result, reason))

            self._raft.apply_batch(codec.encode_batch(batch), callback=done)

    def _proposed(self, pid: int, result: Any, reason: int) -> None:
        entry = self._proposals.pop(pid, None)
        if entry is None:
            return  # expired already
        _, identities = entry
        fenced = False
        if result is not None:
            parsed = log_pb2.BatchResult()
            parsed.ParseFromString(result)
            for identity, res in zip(identities, parsed.results, strict=False):
                if res.verdict == log_pb2.REJECTED:
                    if res.code == log_pb2.REJECT_STALE_EPOCH:
                        fenced = True
                    else:
                        log.warning("record %s rejected: %s", identity, res.reason)
        self._release(identities)
        if fenced:
            log.warning("epoch %d was fenced by a newer leader: stopping", self.epoch)
            self._stop.set()
            if self._on_fenced is not None:
                self._on_fenced()

    def _expire_proposals(self, now: float) -> None:
        for pid, (deadline, identities) in list(self._proposals.items()):
            if deadline <= now:
                del self._proposals[pid]
                self._release(identities)

    def _release(self, identities: list[tuple]) -> None:
        """Forget the pending marks: what was applied arrived as events; the rest is
        proposed again by the next plan."""
        for identity in identities:
            run = self._runs.get(identity[0])
            if run is not None:
                run.pending.pop(identity, None)
                self._touch(identity[0])

    # ---- IO: participant calls -------------------------------------------------------

    def _send_barrier(self, pauses: int) -> None:
        """Commit an empty entry for the lease (see coordinator.lease)."""

        def done(result: Any, reason: int) -> None:
            self._post(("barrier", reason, pauses))

        self._raft.apply_batch(codec.encode_batch([]), callback=done)

    def _call(self, run: _Run, call: core.Call) -> None:
        if self._calls_in_flight >= MAX_CALLS_IN_FLIGHT or not self.lease.may_act():
            self._blocked[run.view.saga_id] = None
            return
        view = run.view
        vertex = view.vertices[call.vertex]
        endpoint = vertex.endpoint
        if self._calls_to[endpoint] >= MAX_CALLS_PER_ENDPOINT:
            self._blocked_on.setdefault(endpoint, OrderedDict())[view.saga_id] = None
            return
        request = core.step_request(view, call, self.epoch)
        request.sent_unix_ms = self._now_ms()  # lets a checker tell sent-late from delivered-late
        if self.lease.paused_since_checked():
            # Paused between `may_act` and here: the stamp above may postdate a newer
            # leader's first call. Ask again later (`may_act` sees the gap).
            self._blocked[run.view.saga_id] = None
            return
        run.calls.add(call)
        self._calls_in_flight += 1
        self._calls_to[endpoint] += 1
        self.stats["calls"] += 1
        saga_id = view.saga_id

        def answer(reply: core.Reply) -> None:
            self._post(("reply", saga_id, call, reply, endpoint))

        self._participants.send(
            endpoint, request, call.compensation, core.timeout_ms(vertex) / 1000, answer
        )
