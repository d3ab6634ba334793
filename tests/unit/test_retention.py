"""The retention policy and the leader's purge loop, against a real SagaLog."""

from __future__ import annotations

import time

from saga.v1 import log_pb2

from cluster.runtime import retention
from cluster.runtime.retention import Retention, purge_cutoff
from sagalog import codec
from sagalog import records as rec
from sagalog.kv import MemoryKV
from sagalog.log import SagaLog

DEF = rec.chain_definition("hotel")


def test_purge_is_due_only_for_sagas_older_than_the_retention_period() -> None:
    assert purge_cutoff(None, 10_000, 5) is None  # nothing ended
    assert purge_cutoff(1_000, 10_000, 0) is None  # 0 keeps everything
    assert purge_cutoff(5_000, 10_000, 5) is None  # exactly 5 s old: not yet
    assert purge_cutoff(4_999, 10_000, 5) == 5_000


class _Cluster:
    """A one-replica stand-in: proposing applies the record to a SagaLog at once."""

    def __init__(self, ended: int, ended_ms: int) -> None:
        self.log = SagaLog(MemoryKV())
        self.index = 1
        self.proposals: list[log_pb2.Record] = []
        self._apply([rec.epoch(1, "n1"), rec.log_format(2)])
        for i in range(ended):
            sid = f"s{i:05d}"
            self._apply(
                [
                    rec.start_saga(sid, 1, DEF, time_ms=ended_ms),
                    rec.start_t(sid, 1, "hotel", 1),
                    rec.end_t(sid, 1, "hotel"),
                    rec.end_saga(sid, 1, log_pb2.OUTCOME_COMPLETED, time_ms=ended_ms),
                ]
            )

    def _apply(self, records: list[log_pb2.Record]) -> log_pb2.BatchResult:
        self.index += 1
        result = log_pb2.BatchResult()
        result.ParseFromString(self.log.apply_batch(codec.encode_batch(records), self.index))
        return result

    def propose(self, record: log_pb2.Record) -> log_pb2.RecordResult:
        self.proposals.append(record)
        return self._apply([record]).results[0]


def test_a_check_purges_in_bounded_records_until_nothing_old_is_left(monkeypatch) -> None:
    monkeypatch.setattr(retention, "SAGAS_PER_PURGE", 10)
    old = int(time.time() * 1000) - 60_000
    c = _Cluster(ended=25, ended_ms=old)
    r = Retention(30, lambda: True, c.log.oldest_ended_ms, c.propose)
    assert r.check() == 25
    assert [p.purge_ended.max_sagas for p in c.proposals] == [10, 10, 10]
    assert all(c.log.records(f"s{i:05d}") == [] for i in range(25))
    assert c.log.oldest_ended_ms() is None
    assert r.check() == 0 and len(c.proposals) == 3  # nothing due: nothing proposed


def test_a_check_is_bounded_and_only_the_office_holder_purges(monkeypatch) -> None:
    monkeypatch.setattr(retention, "SAGAS_PER_PURGE", 2)
    monkeypatch.setattr(retention, "MAX_PURGES_PER_CHECK", 3)
    old = int(time.time() * 1000) - 60_000
    c = _Cluster(ended=10, ended_ms=old)
    assert Retention(30, lambda: False, c.log.oldest_ended_ms, c.propose).check() == 0
    assert c.proposals == []
    r = Retention(30, lambda: True, c.log.oldest_ended_ms, c.propose)
    assert r.check() == 6  # 3 records of 2: the rest waits for the next check
    assert r.check() == 4


def test_recent_sagas_are_kept() -> None:
    c = _Cluster(ended=5, ended_ms=int(time.time() * 1000))
    assert Retention(3600, lambda: True, c.log.oldest_ended_ms, c.propose).check() == 0
    assert c.proposals == [] and len(c.log.records("s00000")) == 4
