"""Metrics from applied records: counts, durations, and the bounds on label values."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from saga.v1 import log_pb2

from cluster.runtime import metrics as m
from cluster.runtime.lifetimes import Lifetimes


def _samples(metrics: m.Metrics) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }


def _start(saga_id: str, name: str, at_ms: int) -> tuple[str, int, log_pb2.Record]:
    record = log_pb2.Record(saga_id=saga_id, epoch=1, time_unix_ms=at_ms)
    record.start_saga.definition.name = name
    return (saga_id, 1, record)


def _end(saga_id: str, outcome: int, at_ms: int) -> tuple[str, int, log_pb2.Record]:
    record = log_pb2.Record(saga_id=saga_id, epoch=1, time_unix_ms=at_ms)
    record.end_saga.outcome = outcome  # type: ignore[assignment]
    return (saga_id, 9, record)


class Node:
    """What the node does with each applied entry: lifetimes first, then metrics."""

    def __init__(self) -> None:
        self.metrics = m.Metrics("n1", lambda: None)
        self.lifetimes = Lifetimes()

    def apply(self, records) -> None:
        ended = self.lifetimes.observe(records)
        self.metrics.on_applied(records, ended, self.lifetimes.definition)


def test_applied_records_count_sagas_and_time_them_by_definition() -> None:
    node = Node()
    metrics = node.metrics
    node.apply([_start("a", "travel", 1_000), _start("b", "travel", 1_000)])
    node.apply([_end("a", log_pb2.OUTCOME_COMPLETED, 1_250)])
    node.apply([_end("b", log_pb2.OUTCOME_ABORTED, 3_000)])
    s = _samples(metrics)
    assert s[("saga_sagas_started_total", (("definition", "travel"),))] == 2
    assert s[("saga_sagas_completed_total", (("definition", "travel"),))] == 1
    assert s[("saga_sagas_aborted_total", (("definition", "travel"),))] == 1
    done = (("definition", "travel"), ("outcome", "completed"))
    assert s[("saga_duration_seconds_sum", done)] == 0.25
    assert s[("saga_records_per_entry_count", ())] == 3


def test_an_end_whose_start_this_node_did_not_see_is_counted_not_timed() -> None:
    node = Node()
    node.apply([_start("a", "travel", 1_000)])
    node.lifetimes.forget()  # a snapshot replaced the store
    node.apply([_end("a", log_pb2.OUTCOME_COMPLETED, 2_000)])
    s = _samples(node.metrics)
    assert s[("saga_sagas_completed_total", (("definition", m.OTHER),))] == 1
    assert not any(name == "saga_duration_seconds_count" for name, _ in s)


def test_client_chosen_label_values_are_bounded() -> None:
    label = m.BoundedLabel(limit=3)
    assert [label(v) for v in "abcdab"] == ["a", "b", "c", m.OTHER, "a", "b"]
    node = Node()
    node.apply([_start(f"s{i}", f"def-{i}", 0) for i in range(m.MAX_LABEL_VALUES + 10)])
    metrics = node.metrics
    names = {
        dict(ls)["definition"] for n, ls in _samples(metrics) if n == "saga_sagas_started_total"
    }
    assert len(names) == m.MAX_LABEL_VALUES + 1 and m.OTHER in names


def test_the_node_state_is_read_at_scrape_time() -> None:
    state = m.NodeState(
        term=7, role="leader", in_office=True, epoch=3, commit_index=10, applied_index=9,
        sagas_in_flight=4, admission_limit=64, journal_bytes=1234, snapshot_age_s=None,
        push_streams=2, leader_changes=1,
    )  # fmt: skip
    s = _samples(m.Metrics("n1", lambda: state))
    assert s[("saga_raft_term", (("node", "n1"),))] == 7
    assert s[("saga_raft_role", (("node", "n1"), ("role", "leader")))] == 1
    assert s[("saga_raft_role", (("node", "n1"), ("role", "follower")))] == 0
    assert s[("saga_leader_changes_total", (("node", "n1"),))] == 1
    assert not any(name == "saga_snapshot_age_seconds" for name, _ in s)
