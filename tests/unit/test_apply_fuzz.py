"""Fuzzing the replicated entry point: whatever bytes a Raft entry holds, apply
returns a result (never raises), and two replicas that apply the same entries end
byte-identical. Random bytes, mutated encodings of real batches, and random
well-formed records (cluster records included: a forged Epoch, Member or PurgeEnded
must not split the replicas either)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from saga.v1 import log_pb2
from test_log import record_strategy

from sagalog import codec
from sagalog import records as rec
from sagalog.kv import MemoryKV
from sagalog.log import LogFormatTooNew, SagaLog

cluster_records = st.one_of(
    st.builds(lambda n, node: rec.epoch(n, node), st.integers(0, 2**64 - 1), st.text(max_size=80)),
    st.builds(lambda n, i: rec.member(n, i), st.text(max_size=80), st.binary(max_size=80)),
    st.builds(rec.forget_member, st.text(max_size=80)),
    st.builds(lambda v: log_pb2.Record(log_format=log_pb2.LogFormat(version=v)), st.integers(0, 3)),
    st.builds(
        lambda cut, n: log_pb2.Record(
            purge_ended=log_pb2.PurgeEnded(ended_before_unix_ms=cut, max_sagas=n)
        ),
        st.integers(0, 2**62),
        st.integers(0, 10_000),
    ),
)
records = st.lists(st.one_of(record_strategy, cluster_records), max_size=12)


def _mutated(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    return bytes(out)


entries = st.one_of(
    st.binary(max_size=2048),
    records.map(codec.encode_batch),
    st.tuples(
        records.map(codec.encode_batch),
        st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6),
    ).map(lambda t: _mutated(*t)),
)


def _apply_all(batches: list[bytes]) -> tuple[SagaLog, list[bytes | str]]:
    log = SagaLog(MemoryKV())
    results: list[bytes | str] = []
    for index, batch in enumerate(batches, start=1):
        try:
            raw = log.apply_batch(batch, index)  # must not raise, whatever the bytes...
        except LogFormatTooNew:
            # ...but a LogFormat above this code's: every replica stops the node at
            # the same entry (fail-stop, "upgrade it"), having written nothing of it.
            assert log.applied_index() == index - 1
            results.append("format too new")
            break
        result = log_pb2.BatchResult()
        result.ParseFromString(raw)
        assert result.raft_index == index
        results.append(raw)
    return log, results


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entries, max_size=15))
def test_apply_never_raises_and_replicas_stay_identical(batches: list[bytes]) -> None:
    one, results_one = _apply_all(batches)
    two, results_two = _apply_all(batches)
    assert results_one == results_two
    assert one.digest() == two.digest()
    stopped = results_one[-1] == "format too new" if results_one else False
    assert one.applied_index() == len(results_one) - stopped


def test_a_log_format_above_this_code_stops_every_replica_at_the_same_entry() -> None:
    too_new = codec.encode_batch([log_pb2.Record(log_format=log_pb2.LogFormat(version=99))])
    ok = codec.encode_batch([rec.epoch(1, "n1")])
    for _ in range(2):
        log, results = _apply_all([ok, too_new, ok])
        assert results[-1] == "format too new" and len(results) == 2
        assert log.applied_index() == 1
