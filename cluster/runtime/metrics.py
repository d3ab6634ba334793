"""Prometheus metrics of one node, served at `--metrics-addr` under /metrics.

Three sources, each at the edge where the fact is known:
* applied records (every node, Raft thread): sagas started, completed, aborted,
  stuck, their durations by definition, records per entry. Every replica applies
  the same records, so every node reports the same counts;
* the coordinator's IO (the leader): participant calls by vertex and outcome, via
  coordinator.calls.ObservedTransport; commit latency, via the proposers'
  `observe_commit`;
* the node's state, read at scrape time (`NodeGauges`): Raft term and role, commit
  and applied index, sagas in flight, the admission limit, journal bytes, snapshot
  age, Watch and Run streams.

Label values that clients choose (definition and vertex names) are bounded:
past MAX_LABEL_VALUES distinct values, further ones are counted as "other".
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from saga.v1 import log_pb2, participant_pb2

from cluster.runtime.lifetimes import OUTCOMES, Lifetime
from coordinator import core
from coordinator.calls import outcome_of

MAX_LABEL_VALUES = 64
OTHER = "other"

DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
CALL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
COMMIT_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
RECORD_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class BoundedLabel:
    """The first MAX_LABEL_VALUES distinct values pass; later ones become OTHER."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self._limit:
                self._seen.add(value)
                return value
        return OTHER


@dataclass(frozen=True)
class NodeState:
    """What the node reports at scrape time (see Node.metrics_state)."""

    term: int
    role: str  # follower | candidate | leader
    in_office: bool
    epoch: int
    commit_index: int
    applied_index: int
    sagas_in_flight: int
    admission_limit: int
    journal_bytes: int
    snapshot_age_s: float | None  # None: no snapshot yet
    push_streams: int
    leader_changes: int


class Metrics:
    def __init__(self, node_id: str, state: Callable[[], NodeState | None]) -> None:
        disable_created_metrics()  # a *_created series beside every counter is noise here
        self.registry = CollectorRegistry(auto_describe=True)
        self._definition = BoundedLabel()
        self._vertex = BoundedLabel()
        r = self.registry
        self.sagas_started = Counter(
            "saga_sagas_started", "Sagas started (StartSaga applied)", ["definition"], registry=r
        )
        self.sagas_completed = Counter(
            "saga_sagas_completed",
            "Sagas ended with every request done",
            ["definition"],
            registry=r,
        )
        self.sagas_aborted = Counter(
            "saga_sagas_aborted",
            "Sagas ended with every started request compensated",
            ["definition"],
            registry=r,
        )
        self.sagas_stuck = Counter(
            "saga_compensations_stuck",
            "Stuck records applied: a compensation kept failing (it is still retried)",
            ["definition"],
            registry=r,
        )
        self.saga_duration = Histogram(
            "saga_duration_seconds",
            "StartSaga to EndSaga, by the records' times, for sagas this node saw start",
            ["definition", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.records_per_entry = Histogram(
            "saga_records_per_entry",
            "Saga records accepted per applied Raft entry",
            buckets=RECORD_BUCKETS,
            registry=r,
        )
        self.participant_calls = Histogram(
            "saga_participant_call_seconds",
            "Participant calls sent by this node's coordinator, by vertex, kind and outcome",
            ["vertex", "kind", "outcome"],
            buckets=CALL_BUCKETS,
            registry=r,
        )
        self.commit_latency = Histogram(
            "saga_commit_seconds",
            "A proposal made on this node until it is applied here",
            buckets=COMMIT_BUCKETS,
            registry=r,
        )
        self.submits_refused = Counter(
            "saga_submits_refused",
            "Submits and Runs refused by admission control (RESOURCE_EXHAUSTED)",
            ["reason"],
            registry=r,
        )
        r.register(NodeGauges(node_id, state))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ---- applied records (Raft thread) ------------------------------------------------

    def on_applied(
        self,
        records: list[tuple[str, int, log_pb2.Record]],
        ended: list[Lifetime],
        definition_of: Callable[[str], str | None],
    ) -> None:
        """Records applied in one entry, and the sagas they ended (`Lifetimes`);
        `definition_of` names the definition of a saga in flight."""
        self.records_per_entry.observe(len(records))
        seen_end = {life.saga_id for life in ended}
        for saga_id, _seq, record in records:
            body = record.WhichOneof("body")
            if body == "start_saga":
                self.sagas_started.labels(self._definition(record.start_saga.definition.name)).inc()
            elif body == "stuck":
                self.sagas_stuck.labels(self._definition(definition_of(saga_id) or OTHER)).inc()
            elif body == "end_saga" and record.end_saga.outcome in OUTCOMES:
                if saga_id not in seen_end:
                    counter = self._ended_counter(OUTCOMES[record.end_saga.outcome])
                    counter.labels(OTHER).inc()  # its start was not seen here
        for life in ended:
            name = self._definition(life.definition)
            self._ended_counter(life.outcome).labels(name).inc()
            seconds = max(0, life.ended_unix_ms - life.started_unix_ms) / 1000
            self.saga_duration.labels(name, life.outcome).observe(seconds)

    def _ended_counter(self, outcome: str) -> Counter:
        return self.sagas_completed if outcome == "completed" else self.sagas_aborted

    # ---- the coordinator's IO --------------------------------------------------------

    def observe_commit(self, seconds: float) -> None:
        self.commit_latency.observe(seconds)

    def observe_call(
        self,
        request: participant_pb2.StepRequest,
        compensation: bool,
        reply: core.Reply,
        sent_ns: int,
        answered_ns: int,
    ) -> None:
        """A participant call answered (coordinator.calls.ObservedTransport)."""
        kind = "compensation" if compensation else "request"
        labels = (self._vertex(request.vertex), kind, outcome_of(reply))
        self.participant_calls.labels(*labels).observe((answered_ns - sent_ns) / 1e9)

    def refused_submit(self, reason: str) -> None:
        self.submits_refused.labels(reason).inc()


class NodeGauges:
    """The node's state at scrape time, as gauges (and the leader-change counter)."""

    def __init__(self, node_id: str, state: Callable[[], NodeState | None]) -> None:
        self._node_id = node_id
        self._state = state

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked: the families are built at scrape time

    def collect(self) -> Iterable[Metric]:
        s = self._state()
        if s is None:  # Raft not started yet
            return
        node = [self._node_id]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["node"])
            family.add_metric(node, value)
            return family

        yield gauge("saga_raft_term", "Raft term this node is in", s.term)
        role = GaugeMetricFamily(
            "saga_raft_role", "1 for this node's Raft role", labels=["node", "role"]
        )
        for name in ("follower", "candidate", "leader"):
            role.add_metric([self._node_id, name], 1.0 if s.role == name else 0.0)
        yield role
        yield gauge(
            "saga_in_office",
            "1 while this node leads with its epoch committed",
            1.0 if s.in_office else 0.0,
        )
        yield gauge("saga_epoch", "The last epoch this node applied", s.epoch)
        yield gauge("saga_raft_commit_index", "Raft commit index", s.commit_index)
        yield gauge("saga_raft_applied_index", "Raft index applied to the store", s.applied_index)
        yield gauge(
            "saga_sagas_in_flight",
            "Sagas this node's coordinator drives (leader)",
            s.sagas_in_flight,
        )
        yield gauge(
            "saga_admission_limit",
            "Sagas in flight past which Submit is refused",
            s.admission_limit,
        )
        yield gauge("saga_journal_bytes", "Bytes of the Raft journal on disk", s.journal_bytes)
        if s.snapshot_age_s is not None:
            yield gauge(
                "saga_snapshot_age_seconds", "Age of the last Raft snapshot", s.snapshot_age_s
            )
        yield gauge("saga_push_streams", "Watch and Run calls waiting on this node", s.push_streams)
        changes = CounterMetricFamily(
            "saga_leader_changes", "Leader changes this node observed", labels=["node"]
        )
        changes.add_metric(node, s.leader_changes)
        yield changes
