"""SagaLog over a KV: the replicated entry point's rules, and a model-based test."""

from __future__ import annotations

import shutil
import tempfile

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from saga.v1 import log_pb2

from sagalog import codec
from sagalog import records as rec
from sagalog.kv import MemoryKV
from sagalog.log import LOG_FORMAT, LogFormatTooNew, SagaLog
from sagalog.rocks import RocksKV
from sagalog.transitions import SagaState, apply, decide

DEF = rec.chain_definition("hotel", "pay")


def apply_records(log: SagaLog, index: int, *records: log_pb2.Record) -> log_pb2.BatchResult:
    result = log_pb2.BatchResult()
    result.ParseFromString(log.apply_batch(codec.encode_batch(list(records)), index))
    return result


def fresh(log_format: int = LOG_FORMAT) -> SagaLog:
    log = SagaLog(MemoryKV())
    result = apply_records(log, 1, rec.epoch(1, "n1"), rec.log_format(log_format))
    assert result.results[0].verdict == log_pb2.ACCEPTED
    return log


def verdicts(result: log_pb2.BatchResult) -> list[int]:
    return [r.verdict for r in result.results]


def test_a_whole_saga_applies_and_leaves_the_in_flight_index() -> None:
    log = fresh()
    result = apply_records(
        log,
        2,
        rec.start_saga("s1", 1, DEF, b"pay"),
        rec.start_t("s1", 1, "hotel", 1),
        rec.end_t("s1", 1, "hotel", b"H-1"),
    )
    assert verdicts(result) == [log_pb2.ACCEPTED] * 3
    assert [r.seq for r in result.results] == [0, 1, 2]
    assert list(log.in_flight()) == ["s1"]
    apply_records(
        log,
        3,
        rec.start_t("s1", 1, "pay", 1),
        rec.end_t("s1", 1, "pay"),
        rec.end_saga("s1", 1, log_pb2.OUTCOME_COMPLETED),
    )
    assert list(log.in_flight()) == []
    assert [r.WhichOneof("body") for r in log.records("s1")] == [
        "start_saga",
        "start_t",
        "end_t",
        "start_t",
        "end_t",
        "end_saga",
    ]
    assert log.applied_index() == 3


def test_a_batch_is_validated_in_order() -> None:
    log = fresh()
    # EndT before its StartT in the same batch is rejected; after it, accepted.
    result = apply_records(
        log,
        2,
        rec.end_t("s1", 1, "hotel"),
        rec.start_saga("s1", 1, DEF),
        rec.end_t("s1", 1, "hotel"),
        rec.start_t("s1", 1, "hotel", 1),
        rec.end_t("s1", 1, "hotel"),
    )
    assert verdicts(result) == [
        log_pb2.REJECTED,
        log_pb2.ACCEPTED,
        log_pb2.REJECTED,
        log_pb2.ACCEPTED,
        log_pb2.ACCEPTED,
    ]
    assert "unknown saga" in result.results[0].reason


def test_same_record_twice_is_accepted_once_and_answered_with_the_first_result() -> None:
    log = fresh()
    first = apply_records(log, 2, rec.start_saga("s1", 1, DEF, b"p"))
    again = apply_records(log, 3, rec.start_saga("s1", 1, DEF, b"p"))
    assert again.results[0].verdict == log_pb2.DUPLICATE
    assert again.results[0].seq == first.results[0].seq == 0
    assert len(log.records("s1")) == 1


def test_start_saga_with_another_payload_under_the_same_id_is_a_conflict() -> None:
    log = fresh()
    apply_records(log, 2, rec.start_saga("s1", 1, DEF, b"p"))
    result = apply_records(log, 3, rec.start_saga("s1", 1, DEF, b"other"))
    assert result.results[0].verdict == log_pb2.REJECTED
    assert result.results[0].code == log_pb2.REJECT_CONFLICT


def test_fencing_rejects_records_of_an_older_epoch() -> None:
    log = fresh()
    apply_records(log, 2, rec.start_saga("s1", 1, DEF))
    assert apply_records(log, 3, rec.epoch(2, "n2")).results[0].verdict == log_pb2.ACCEPTED
    stale = apply_records(log, 4, rec.start_t("s1", 1, "hotel", 1))
    assert stale.results[0].verdict == log_pb2.REJECTED
    assert "fenced" in stale.results[0].reason
    assert stale.results[0].code == log_pb2.REJECT_STALE_EPOCH
    future = apply_records(log, 5, rec.start_t("s1", 3, "hotel", 1))
    assert "never committed" in future.results[0].reason
    ok = apply_records(log, 6, rec.start_t("s1", 2, "hotel", 1))
    assert ok.results[0].verdict == log_pb2.ACCEPTED
    # A retried record of the old epoch that was applied before is still a duplicate.
    assert apply_records(log, 7, rec.start_saga("s1", 1, DEF)).results[0].verdict == (
        log_pb2.DUPLICATE
    )


def test_epochs_only_grow() -> None:
    log = fresh()
    assert apply_records(log, 2, rec.epoch(1, "n1")).results[0].verdict == log_pb2.DUPLICATE
    assert apply_records(log, 3, rec.epoch(1, "n2")).results[0].verdict == log_pb2.REJECTED
    assert log.epoch().node_id == "n1"


def test_garbage_bytes_are_a_result_and_advance_the_applied_index() -> None:
    log = fresh()
    for i, junk in enumerate([b"\xff\xfe garbage", b"", b"\x08\x07"], start=2):
        raw = log.apply_batch(junk, i)
        result = log_pb2.BatchResult()
        result.ParseFromString(raw)
        assert result.error
        assert log.applied_index() == i


def test_bad_saga_ids_and_oversized_payloads_are_rejected() -> None:
    log = fresh()
    result = apply_records(
        log,
        2,
        rec.start_saga("", 1, DEF),
        rec.start_saga("x" * (codec.MAX_SAGA_ID_LEN + 1), 1, DEF),
        rec.start_saga("bad id!", 1, DEF),
        rec.start_saga("s1", 1, DEF, b"x" * (codec.MAX_PAYLOAD_BYTES + 1)),
    )
    assert verdicts(result) == [log_pb2.REJECTED] * 4
    assert "limit" in result.results[3].reason


def test_replayed_entries_change_nothing() -> None:
    log = fresh()
    apply_records(log, 2, rec.start_saga("s1", 1, DEF))
    before = log.digest()
    result = apply_records(log, 2, rec.start_saga("s2", 1, DEF))
    assert result.error == "already applied"
    assert log.digest() == before


def test_member_registry_refuses_a_new_incarnation_until_forgotten() -> None:
    log = fresh()
    assert apply_records(log, 2, rec.member("n2", b"A")).results[0].verdict == log_pb2.ACCEPTED
    assert apply_records(log, 3, rec.member("n2", b"A")).results[0].verdict == log_pb2.DUPLICATE
    refused = apply_records(log, 4, rec.member("n2", b"B")).results[0]
    assert refused.verdict == log_pb2.REJECTED and "forget-node" in refused.reason
    apply_records(log, 5, rec.forget_member("n2"))
    assert apply_records(log, 6, rec.member("n2", b"B")).results[0].verdict == log_pb2.ACCEPTED


# ---- model-based: RocksDB store + SagaLog, with close/reopen and replay, against a dict ----

SAGAS = ["s1", "s2", "s3"]
VERTICES = ["hotel", "pay"]

record_strategy = st.one_of(
    st.builds(lambda s, e: rec.start_saga(s, e, DEF), st.sampled_from(SAGAS), st.integers(0, 3)),
    st.builds(
        lambda s, e, v, a: rec.start_t(s, e, v, a),
        st.sampled_from(SAGAS),
        st.integers(0, 3),
        st.sampled_from(VERTICES),
        st.integers(1, 2),
    ),
    st.builds(
        lambda s, e, v, o: rec.end_t(s, e, v, o),
        st.sampled_from(SAGAS),
        st.integers(0, 3),
        st.sampled_from(VERTICES),
        st.sampled_from([b"", b"x"]),
    ),
    st.builds(
        lambda s, e, v: rec.fail_t(s, e, v, "no"),
        st.sampled_from(SAGAS),
        st.integers(0, 3),
        st.sampled_from(VERTICES),
    ),
    st.builds(lambda s, e: rec.abort_saga(s, e, "user"), st.sampled_from(SAGAS), st.integers(0, 3)),
    st.builds(
        lambda s, e, v, a: rec.start_c(s, e, v, a),
        st.sampled_from(SAGAS),
        st.integers(0, 3),
        st.sampled_from(VERTICES),
        st.integers(1, 2),
    ),
    st.builds(
        lambda s, e, v: rec.end_c(s, e, v),
        st.sampled_from(SAGAS),
        st.integers(0, 3),
        st.sampled_from(VERTICES),
    ),
    st.builds(
        lambda s, e, o: rec.end_saga(s, e, o),
        st.sampled_from(SAGAS),
        st.integers(0, 3),
        st.sampled_from([log_pb2.OUTCOME_COMPLETED, log_pb2.OUTCOME_ABORTED]),
    ),
    st.builds(lambda n: rec.epoch(n, "n1"), st.integers(1, 3)),
)


class LogModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.kv = RocksKV(self.dir + "/db")
        self.log = SagaLog(self.kv)
        self.journal: list[bytes] = []  # every committed entry, as Raft would replay it
        self.model: dict[str, tuple[SagaState, list[bytes]]] = {}
        self.epoch = 0

    def teardown(self) -> None:
        self.kv.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def expected(self, record: log_pb2.Record) -> tuple[int, int]:
        """(verdict, seq) by the dictionary model."""
        if record.HasField("epoch_start"):
            n = record.epoch_start.number
            if n == self.epoch:
                return log_pb2.DUPLICATE, 0
            if n < self.epoch:
                return log_pb2.REJECTED, 0
            self.epoch = n
            return log_pb2.ACCEPTED, 0
        state, stored = self.model.setdefault(record.saga_id, (SagaState(), []))
        event = codec.to_event(record).event
        assert event is not None
        decision = decide(state, event)
        if decision.duplicate_of is not None:
            return log_pb2.DUPLICATE, decision.duplicate_of
        if record.epoch != self.epoch or not decision.accepted:
            return log_pb2.REJECTED, 0
        apply(state, event)
        stored.append(codec.encode_record(record))
        return log_pb2.ACCEPTED, len(stored) - 1

    @rule(records=st.lists(record_strategy, min_size=1, max_size=6))
    def commit(self, records: list[log_pb2.Record]) -> None:
        data = codec.encode_batch(records)
        self.journal.append(data)
        result = log_pb2.BatchResult()
        result.ParseFromString(self.log.apply_batch(data, len(self.journal)))
        for record, got in zip(records, result.results, strict=True):
            verdict, seq = self.expected(record)
            assert got.verdict == verdict, (record, got)
            if verdict != log_pb2.REJECTED and not record.HasField("epoch_start"):
                assert got.seq == seq

    @rule(junk=st.binary(max_size=20))
    def commit_garbage(self, junk: bytes) -> None:
        self.journal.append(junk)
        self.log.apply_batch(junk, len(self.journal))

    @precondition(lambda self: self.journal)
    @rule()
    def restart_and_replay(self) -> None:
        """Close, reopen, and replay the whole journal as pysyncobj does at start-up."""
        self.kv.close()
        self.kv = RocksKV(self.dir + "/db")
        self.log = SagaLog(self.kv)
        for index, data in enumerate(self.journal, start=1):
            self.log.apply_batch(data, index)

    @invariant()
    def store_matches_model(self) -> None:
        assert self.log.applied_index() == len(self.journal)
        assert self.log.epoch().number == self.epoch
        for saga_id, (_state, stored) in self.model.items():
            got = [codec.encode_record(r) for r in self.log.records(saga_id)]
            assert got == stored
        in_flight = {
            s
            for s, (state, _) in self.model.items()
            if state.phase.value in ("RUNNING", "ABORTING")
        }
        assert set(self.log.in_flight()) == in_flight


LogModel.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestLogModel = LogModel.TestCase


# ---- retention -----------------------------------------------------------------------


def ended_saga(
    log: SagaLog, index: int, saga_id: str, ended_ms: int, aborted: bool = False
) -> None:
    records = [rec.start_saga(saga_id, 1, DEF, b"p", time_ms=ended_ms - 50)]
    if aborted:
        records += [rec.abort_saga(saga_id, 1, "user asked", ended_ms - 10)]
        outcome = log_pb2.OUTCOME_ABORTED
    else:
        for vertex in ("hotel", "pay"):
            records += [rec.start_t(saga_id, 1, vertex, 1), rec.end_t(saga_id, 1, vertex)]
        outcome = log_pb2.OUTCOME_COMPLETED
    records.append(rec.end_saga(saga_id, 1, outcome, time_ms=ended_ms))
    assert set(verdicts(apply_records(log, index, *records))) == {log_pb2.ACCEPTED}


def retention_log() -> SagaLog:
    """s1..s3 ended at 1000, 2000, 3000 ms (s2 aborted); s4 in flight."""
    log = fresh()
    ended_saga(log, 2, "s1", 1000)
    ended_saga(log, 3, "s2", 2000, aborted=True)
    ended_saga(log, 4, "s3", 3000)
    apply_records(log, 5, rec.start_saga("s4", 1, DEF, b"p"))
    return log


def test_purge_replaces_the_oldest_ended_sagas_by_tombstones() -> None:
    log = retention_log()
    result = apply_records(log, 6, rec.purge_ended(2500, 1000, time_ms=9000))
    assert verdicts(result) == [log_pb2.ACCEPTED] and result.results[0].purged == 2
    assert log.records("s1") == [] and log.records("s2") == []
    assert len(log.records("s3")) == 6 and len(log.records("s4")) == 1
    stone = log.tombstone("s2")
    assert stone is not None
    assert stone.outcome == log_pb2.OUTCOME_ABORTED
    assert (stone.started_unix_ms, stone.ended_unix_ms, stone.purged_unix_ms) == (1950, 2000, 9000)
    assert stone.records == 3 and stone.abort_reason == "user asked"
    assert log.tombstone("s3") is None
    assert log.has_ended("s1") and list(log.in_flight()) == ["s4"]
    assert log.oldest_ended_ms() == 3000
    # Nothing older is left: the same purge again purges nothing.
    again = apply_records(log, 7, rec.purge_ended(2500, 1000))
    assert again.results[0].purged == 0


def test_one_purge_takes_at_most_max_sagas_oldest_first() -> None:
    log = retention_log()
    result = apply_records(log, 6, rec.purge_ended(10_000, 1), rec.purge_ended(10_000, 1))
    assert [r.purged for r in result.results] == [1, 1]
    assert log.records("s1") == [] and log.records("s2") == []
    assert len(log.records("s3")) == 6


def test_a_purged_saga_is_still_known_to_the_rules() -> None:
    for cold in (False, True):  # with its state cached, and re-read from the store
        log = retention_log()
        apply_records(log, 6, rec.purge_ended(1500, 10))
        if cold:
            log = SagaLog(log.kv)
        result = apply_records(
            log,
            7,
            rec.start_saga("s1", 1, DEF, b"p"),  # the same Submit, retried late
            rec.start_saga("s1", 1, DEF, b"other"),
            rec.start_t("s1", 1, "hotel", 2),
        )
        assert verdicts(result) == [log_pb2.DUPLICATE, log_pb2.REJECTED, log_pb2.REJECTED]
        assert result.results[0].seq == 0
        assert result.results[1].code == log_pb2.REJECT_CONFLICT
        assert result.results[2].code == log_pb2.REJECT_OUT_OF_ORDER  # its saga was refused
        assert log.records("s1") == []


def test_bad_purge_records_are_rejected() -> None:
    log = retention_log()
    bad_id = rec.purge_ended(10_000, 10)
    bad_id.saga_id = "s1"
    result = apply_records(
        log, 6, rec.purge_ended(10_000, 0), rec.purge_ended(10_000, 1001), bad_id
    )
    assert verdicts(result) == [log_pb2.REJECTED] * 3
    assert len(log.records("s1")) == 6


def test_replicas_that_purge_the_same_entries_stay_identical() -> None:
    a, b = retention_log(), retention_log()
    b = SagaLog(b.kv)  # another replica: nothing cached
    for log in (a, b):
        apply_records(log, 6, rec.purge_ended(2500, 1000, time_ms=9000))
        ended_saga(log, 7, "s5", 4000)
        apply_records(log, 8, rec.purge_ended(3500, 1000, time_ms=9500))
    assert a.digest() == b.digest()
    assert a.digest().records == 6 + 1  # s5's records and s4's StartSaga are left


def test_a_saga_ended_without_a_time_is_not_older_than_the_log() -> None:
    """Records proposed with time 0 (the field's default) must not look ended in 1970."""
    log = fresh()
    ended_saga(log, 2, "s1", 5000)
    apply_records(
        log,
        3,
        rec.start_saga("s2", 1, DEF),
        rec.abort_saga("s2", 1, "no"),
        rec.end_saga("s2", 1, log_pb2.OUTCOME_ABORTED),  # time 0
    )
    assert apply_records(log, 4, rec.purge_ended(4999, 10)).results[0].purged == 0
    assert apply_records(log, 5, rec.purge_ended(5001, 10)).results[0].purged == 2
    # Cluster records move the clock too: a leader's Epoch carries its time.
    apply_records(log, 6, rec.epoch(2, "n2", time_ms=9000))
    apply_records(log, 7, rec.start_saga("s3", 2, DEF), rec.abort_saga("s3", 2, "no"))
    apply_records(log, 8, rec.end_saga("s3", 2, log_pb2.OUTCOME_ABORTED))
    assert log.oldest_ended_ms() == 9000


def test_the_cheap_identity_is_the_events_identity() -> None:
    samples = [
        rec.start_saga("s", 1, DEF, b"p"),
        rec.start_t("s", 1, "hotel", 3),
        rec.end_t("s", 1, "hotel", b"H"),
        rec.fail_t("s", 1, "hotel", "no"),
        rec.abort_saga("s", 1, "why"),
        rec.start_c("s", 1, "hotel", 2),
        rec.end_c("s", 1, "hotel"),
        rec.stuck("s", 1, "hotel", "still failing"),
        rec.end_saga("s", 1, log_pb2.OUTCOME_ABORTED),
    ]
    for record in samples:
        event = codec.to_event(record).event
        assert event is not None
        assert codec.identity(record) == event.identity, record
    assert codec.identity(rec.epoch(1, "n1")) is None


def test_a_record_after_a_purge_in_the_same_batch_sees_the_purged_saga() -> None:
    """The cached state must not outlive the purge: replicas with and without the
    saga cached, and one started after this batch, answer the same: the saga is
    purged, so even a replay of its own EndT is refused, not a DUPLICATE."""
    for cold in (False, True):
        log = retention_log()
        if cold:
            log = SagaLog(log.kv)
        result = apply_records(log, 6, rec.purge_ended(1500, 10), rec.end_t("s1", 1, "hotel"))
        assert result.results[0].purged == 1
        assert result.results[1].verdict == log_pb2.REJECTED, (cold, result.results[1])


def test_entries_before_the_log_format_record_keep_the_old_rules() -> None:
    """A replica that catches up after an upgrade applies old entries as the
    replicas that applied them before the upgrade did: no ended index, no clock,
    no purge. From the LogFormat record on, every replica applies the new rules."""
    log = fresh(log_format=1)  # format 1 is a DUPLICATE: the log starts there
    ended_saga(log, 2, "s1", 1000)
    assert log.oldest_ended_ms() is None
    refused = apply_records(log, 3, rec.purge_ended(10_000, 10))
    assert verdicts(refused) == [log_pb2.REJECTED] and "format" in refused.results[0].reason
    moved = apply_records(log, 4, rec.log_format(2), rec.log_format(2), rec.log_format(1))
    assert verdicts(moved) == [log_pb2.ACCEPTED, log_pb2.DUPLICATE, log_pb2.REJECTED]
    assert log.log_format() == 2
    ended_saga(log, 5, "s2", 2000)
    assert log.oldest_ended_ms() == 2000  # only sagas ended under format 2 are indexed
    assert apply_records(log, 6, rec.purge_ended(10_000, 10)).results[0].purged == 1
    assert len(log.records("s1")) == 6 and log.records("s2") == []


def test_a_node_too_old_for_the_log_format_stops_instead_of_diverging() -> None:
    log = fresh()
    with pytest.raises(LogFormatTooNew):
        apply_records(log, 2, rec.log_format(LOG_FORMAT + 1))


def test_from_format_3_apply_refuses_what_submit_refuses() -> None:
    """No path into the log bypasses Submit's checks: a StartSaga with a definition
    Submit would refuse, or an Epoch that skips ahead (Epoch(2^64-1) once left a
    cluster where no leader could take office), is rejected at apply."""
    log = fresh(3)
    bad = rec.chain_definition("a", endpoint="unix:/var/run/docker.sock")
    result = apply_records(log, 2, rec.start_saga("s-bad", 1, bad, b""))
    assert result.results[0].verdict == log_pb2.REJECTED
    assert "endpoint" in result.results[0].reason
    skip = apply_records(log, 3, rec.epoch(2**64 - 1, "evil"))
    assert skip.results[0].verdict == log_pb2.REJECTED
    assert "next epoch is 2" in skip.results[0].reason
    assert apply_records(log, 4, rec.epoch(2, "n2")).results[0].verdict == log_pb2.ACCEPTED


def test_before_format_3_old_entries_apply_under_the_old_rules() -> None:
    log = fresh(2)  # a journal written before the upgrade replays alike everywhere
    bad = rec.chain_definition("a", endpoint="unix:/var/run/docker.sock")
    result = apply_records(log, 2, rec.start_saga("s-old", 1, bad, b""))
    assert result.results[0].verdict == log_pb2.ACCEPTED
    assert apply_records(log, 3, rec.epoch(7, "n2")).results[0].verdict == log_pb2.ACCEPTED
