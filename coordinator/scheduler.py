"""The coordinator's scheduler: which sagas to re-plan, what to propose, which
participant calls to start, and when to retry. No clock, thread, store or network:
events and the time come in as arguments, and what to do goes out as values that
`coordinator.driver` carries out.

It folds applied records into per-saga views and asks `coordinator.core` what each
saga needs: records go to the outbox (all of a turn's records become one Raft entry:
group commit without a fixed wait; what follows a proposed record, such as the StartT
an EndT unblocks, joins it), calls become orders. It acts on applied records, not on
proposal outcomes: a lost outcome only clears a "pending" mark after its deadline, and
the next plan proposes the record again (the log answers DUPLICATE if it was applied).
A periodic sweep of the in-flight index re-plans every saga, so nothing is stranded.

Permission to act (the lease) is asked through `may_act`, a function the driver gives.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from saga.v1 import log_pb2, participant_pb2

from coordinator import core
from coordinator.admission import AdmissionLimit
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

Identity = tuple  # (saga id, *codec.identity(record))


@dataclass
class Run:
    view: SagaView
    calls: set[core.Call] = field(default_factory=set)  # outstanding participant calls
    waiting: set[core.Call] = field(default_factory=set)  # failed calls awaiting a retry
    # Records proposed and not applied yet, by identity, in the order they were
    # proposed: the plan decides what follows them without waiting for their commit.
    pending: dict[Identity, log_pb2.Record] = field(default_factory=dict)


@dataclass(frozen=True)
class CallOrder:
    """A participant call to start."""

    saga_id: str
    call: core.Call
    endpoint: str
    request: participant_pb2.StepRequest
    timeout_s: float


@dataclass(frozen=True)
class Proposal:
    """One Raft entry to propose; its outcome comes back as `proposed(pid, ...)`."""

    pid: int
    records: list[log_pb2.Record]


def _take(queue: OrderedDict[str, None], limit: int) -> list[str]:
    """Remove and return up to `limit` saga ids from the front of `queue`."""
    return [queue.popitem(last=False)[0] for _ in range(min(len(queue), limit))]


def identity(record: log_pb2.Record) -> Identity:
    found = codec.identity(record)
    assert found is not None, "the scheduler sees saga records only"
    return (record.saga_id, *found)


class Scheduler:
    def __init__(self, epoch: int, started_ms: int, now: float) -> None:
        self.epoch = epoch
        self.runs: dict[str, Run] = {}
        # Sagas to re-plan, oldest first: only these are looked at in a turn.
        self.dirty: OrderedDict[str, None] = OrderedDict()
        self.backlog = False  # more work than one turn does: no idle wait
        self._to_load: OrderedDict[str, None] = OrderedDict()  # in flight, not read yet
        # Sagas with a call to make that had to wait (no call budget, or no permission
        # to act): re-planned when budget frees up and the driver may act, not every
        # turn (with 10,000 calls out to a hung participant that was a busy loop).
        self.blocked: OrderedDict[str, None] = OrderedDict()
        self._timers: list[tuple[float, int, str, core.Call]] = []
        self._timer_seq = 0
        self._proposals: dict[int, tuple[float, list[Identity]]] = {}
        self._proposal_seq = 0
        # (record, its identity, when it was queued), oldest first
        self.outbox: list[tuple[log_pb2.Record, Identity, float]] = []
        self.calls_in_flight = 0
        self.calls_to: Counter[str] = Counter()  # calls in flight by endpoint
        # Sagas waiting for a call slot of one endpoint, woken by its replies.
        self.blocked_on: dict[str, OrderedDict[str, None]] = {}
        self._orders: list[CallOrder] = []
        self.next_sweep = 0.0
        self.stats = {"proposals": 0, "records": 0, "calls": 0, "replies": 0}
        # How many sagas may be in flight (Submit asks), from the latency of the
        # sagas started in this term (older ones' latency holds the failover).
        self.admission = AdmissionLimit(now)
        self._started_ms = started_ms

    # ---- events ----------------------------------------------------------------------

    def adopt(self, views: dict[str, SagaView]) -> None:
        """In-flight sagas already folded (`coordinator.standby`): not read again."""
        for saga_id, view in views.items():
            if view.phase in (Phase.RUNNING, Phase.ABORTING):
                self.runs[saga_id] = Run(view)
                self.touch(saga_id)

    def applied(self, saga_id: str, seq: int, record: log_pb2.Record) -> bool:
        """Fold an applied record. False: the saga must be read from the store
        (unknown here, or a gap) and given to `loaded`."""
        run = self.runs.get(saga_id)
        if run is None:
            return False
        run.pending.pop(identity(record), None)
        if seq == run.view.next_seq:
            run.view.add(record)
            if record.HasField("end_saga"):
                view = run.view
                fresh = view.started_ms >= self._started_ms  # started in this term
                self.admission.on_ended((view.ended_ms - view.started_ms) / 1000 if fresh else None)
        elif seq > run.view.next_seq:
            return False
        self.touch(saga_id)
        return True

    def loaded(self, saga_id: str, records: list[log_pb2.Record]) -> None:
        """A saga as the store has it."""
        view = SagaView.from_records(saga_id, records)
        if view.phase in (Phase.RUNNING, Phase.ABORTING):
            old = self.runs.get(saga_id)
            run = Run(view)
            if old is not None:  # keep what is outstanding
                run.calls, run.waiting, run.pending = old.calls, old.waiting, old.pending
            self.runs[saga_id] = run
            self.touch(saga_id)
        else:
            self.runs.pop(saga_id, None)

    def swept(self, in_flight: set[str], now: float) -> list[str]:
        """The safety net, given the store's in-flight index: pick up in-flight sagas
        the events did not bring, and re-plan every saga that waits on nothing (no
        call, retry timer or proposal outstanding), which only a lost event can leave
        behind. Returns the sagas to read again now: those that left the index while
        their view says they run (a stale adopted view)."""
        interval = max(SWEEP_INTERVAL_S, len(in_flight) / SWEEP_SAGAS_PER_S)
        self.next_sweep = now + interval
        for saga_id in in_flight - self.runs.keys():
            self._to_load[saga_id] = None
        reread = []
        for saga_id, run in list(self.runs.items()):
            if saga_id not in in_flight:
                if run.view.phase is Phase.ENDED:
                    del self.runs[saga_id]
                else:
                    reread.append(saga_id)
            elif not (run.calls or run.waiting or run.pending):
                self.touch(saga_id)
        return reread

    def replied(
        self,
        saga_id: str,
        call: core.Call,
        reply: core.Reply,
        endpoint: str,
        now: float,
        now_ms: int,
    ) -> None:
        self._free_slot(endpoint)
        self.stats["replies"] += 1
        run = self.runs.get(saga_id)
        if run is None:
            return
        run.calls.discard(call)
        response = core.on_reply(run.view, call, reply, self.epoch, now_ms)
        self._propose(run, response.records, now)
        if response.retry_after_ms is not None:
            run.waiting.add(call)
            self._timer_seq += 1
            due = now + response.retry_after_ms / 1000
            heapq.heappush(self._timers, (due, self._timer_seq, saga_id, call))
        else:
            # Re-plan in this turn: what follows the reply's records (the StartT they
            # unblock, EndSaga) joins them in this turn's entry; a stale or ignored
            # reply is re-planned too.
            self.touch(saga_id)

    def proposed(self, pid: int, results: Iterable[log_pb2.RecordResult] | None) -> bool:
        """A proposal's outcome (None: it failed). True if a newer leader fenced this
        epoch: the driver must stop."""
        entry = self._proposals.pop(pid, None)
        if entry is None:
            return False  # expired already
        _, identities = entry
        fenced = False
        for found, res in zip(identities, results or (), strict=False):
            if res.verdict == log_pb2.REJECTED:
                if res.code == log_pb2.REJECT_STALE_EPOCH:
                    fenced = True
                else:
                    log.warning(
                        "record %s rejected: %s",
                        found,
                        res.reason,
                        extra={"saga_id": found[0], "epoch": self.epoch},
                    )
        self._release(identities)
        return fenced

    # ---- the turn ----------------------------------------------------------------------

    def wait_s(self, now: float, idle_wait_s: float) -> float:
        """How long the driver may wait for events before the next turn."""
        timeout = 0.0 if self.backlog else idle_wait_s
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - now))
        return timeout

    def tick(self, now: float, now_ms: int, may_act: Callable[[], bool]) -> None:
        """Fire due retry timers, expire proposals without an outcome, adapt the
        admission limit, and re-plan blocked sagas if calls may be made."""
        while self._timers and self._timers[0][0] <= now:
            _, _, saga_id, call = heapq.heappop(self._timers)
            self._retry(saga_id, call, now, now_ms, may_act)
        for pid, (deadline, identities) in list(self._proposals.items()):
            if deadline <= now:
                del self._proposals[pid]
                self._release(identities)
        self.admission.update(now, len(self.runs))
        free = MAX_CALLS_IN_FLIGHT - self.calls_in_flight
        if self.blocked and free > 0 and may_act():
            for saga_id in _take(self.blocked, free):
                self.touch(saga_id)

    def loads(self) -> list[str]:
        """In-flight sagas to read from the store in this turn."""
        return [s for s in _take(self._to_load, MAX_LOADS_PER_TURN) if s not in self.runs]

    def advance(self, now: float, now_ms: int, may_act: Callable[[], bool]) -> None:
        """Re-plan the dirty sagas (at most MAX_ADVANCE_PER_TURN)."""
        self.backlog = bool(self._to_load) or len(self.dirty) > MAX_ADVANCE_PER_TURN
        for saga_id in _take(self.dirty, MAX_ADVANCE_PER_TURN):
            run = self.runs.get(saga_id)
            if run is None:
                continue
            if run.view.phase is Phase.ENDED:
                self.runs.pop(saga_id, None)
                continue
            plan = core.plan_ahead(run.view, list(run.pending.values()), self.epoch, now_ms)
            self._propose(run, plan.records, now)
            for call in plan.calls:
                if call not in run.calls and call not in run.waiting:
                    self._order(run, call, now_ms, may_act)

    def take_orders(self) -> list[CallOrder]:
        orders, self._orders = self._orders, []
        return orders

    def not_sent(self, order: CallOrder) -> None:
        """The driver could not send `order` (paused since `may_act`): undo it; the
        saga waits for the permission to act again."""
        run = self.runs.get(order.saga_id)
        if run is not None:
            run.calls.discard(order.call)
        self._free_slot(order.endpoint)
        self.stats["calls"] -= 1
        self.blocked[order.saga_id] = None

    def proposals(self, now: float, may_act: Callable[[], bool]) -> list[Proposal]:
        """The outbox as Raft entries, if this epoch may act now (else kept)."""
        if not self.outbox or not may_act():
            return []
        out = []
        while self.outbox and len(self._proposals) < MAX_PROPOSALS_IN_FLIGHT:
            count, size = 0, 0
            for record, _, _ in self.outbox[:MAX_RECORDS_PER_PROPOSAL]:
                size += record.ByteSize() + 8
                if count and size > MAX_PROPOSAL_BYTES:
                    break
                count += 1
            batch = [record for record, _, _ in self.outbox[:count]]
            identities = [found for _, found, _ in self.outbox[:count]]
            del self.outbox[:count]
            self._proposal_seq += 1
            pid = self._proposal_seq
            self._proposals[pid] = (now + PROPOSAL_DEADLINE_S, identities)
            self.stats["proposals"] += 1
            self.stats["records"] += len(batch)
            out.append(Proposal(pid, batch))
        return out

    def outbox_since(self) -> float | None:
        """When the oldest record waiting to be proposed was queued (any thread)."""
        try:
            return self.outbox[0][2]
        except IndexError:
            return None

    def loads_waiting(self) -> int:
        return len(self._to_load)

    def resumed(self) -> bool:
        """Every in-flight saga picked up and re-planned."""
        return not self._to_load and not self.backlog

    # ---- helpers -----------------------------------------------------------------------

    def touch(self, saga_id: str) -> None:
        """Re-plan this saga in a coming turn."""
        self.dirty[saga_id] = None

    def _free_slot(self, endpoint: str) -> None:
        """A call to `endpoint` ended (or was never sent): wake a saga waiting for
        one of its slots."""
        self.calls_in_flight -= 1
        self.calls_to[endpoint] -= 1
        if self.calls_to[endpoint] <= 0:
            del self.calls_to[endpoint]  # endpoints come from clients: keep no zeros
        waiting = self.blocked_on.get(endpoint)
        if waiting:
            for blocked in _take(waiting, MAX_CALLS_PER_ENDPOINT - self.calls_to[endpoint]):
                self.touch(blocked)
            if not waiting:
                del self.blocked_on[endpoint]

    def _propose(self, run: Run, records: list[log_pb2.Record], now: float) -> None:
        for record in records:
            found = identity(record)
            if found not in run.pending:
                run.pending[found] = record
                self.outbox.append((record, found, now))

    def _retry(
        self, saga_id: str, call: core.Call, now: float, now_ms: int, may_act: Callable[[], bool]
    ) -> None:
        run = self.runs.get(saga_id)
        if run is None:
            return
        run.waiting.discard(call)
        records = core.retry(run.view, call, self.epoch, now_ms)
        if records is None:
            self.touch(saga_id)
        elif records:
            self._propose(run, records, now)
        else:
            self._order(run, call, now_ms, may_act)

    def _release(self, identities: list[Identity]) -> None:
        """Forget the pending marks: what was applied arrived as events; the rest is
        proposed again by the next plan."""
        for found in identities:
            run = self.runs.get(found[0])
            if run is not None:
                run.pending.pop(found, None)
                self.touch(found[0])

    def _order(self, run: Run, call: core.Call, now_ms: int, may_act: Callable[[], bool]) -> None:
        if self.calls_in_flight >= MAX_CALLS_IN_FLIGHT or not may_act():
            self.blocked[run.view.saga_id] = None
            return
        view = run.view
        vertex = view.vertices[call.vertex]
        endpoint = vertex.endpoint
        if self.calls_to[endpoint] >= MAX_CALLS_PER_ENDPOINT:
            self.blocked_on.setdefault(endpoint, OrderedDict())[view.saga_id] = None
            return
        request = core.step_request(view, call, self.epoch)
        request.sent_unix_ms = now_ms  # the driver stamps it again as it sends
        run.calls.add(call)
        self.calls_in_flight += 1
        self.calls_to[endpoint] += 1
        self.stats["calls"] += 1
        timeout_s = core.timeout_ms(vertex) / 1000
        self._orders.append(CallOrder(view.saga_id, call, endpoint, request, timeout_s))
