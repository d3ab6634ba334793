"""The warm standby (coordinator/standby.py): a follower's views of the sagas in
flight equal what the coordinator would read from the store, or are left out."""

from __future__ import annotations

from contextlib import contextmanager

from saga.v1 import log_pb2

from coordinator.driver import Driver
from coordinator.memory_calls import InMemoryCalls
from coordinator.standby import Standby
from coordinator.view import SagaView
from sagalog import records as rec

DEFINITION = rec.chain_definition("a", "b")


def saga(saga_id: str) -> list[log_pb2.Record]:
    """A two-step saga's records up to its end, in log order."""
    return [
        rec.start_saga(saga_id, 1, DEFINITION, b"{}"),
        rec.start_t(saga_id, 1, "a", 1),
        rec.end_t(saga_id, 1, "a", b"out-a"),
        rec.start_t(saga_id, 1, "b", 1),
        rec.end_t(saga_id, 1, "b", b"out-b"),
        rec.end_saga(saga_id, 1, log_pb2.OUTCOME_COMPLETED),
    ]


def applied(saga_id: str, records: list[log_pb2.Record], first_seq: int = 0) -> list[tuple]:
    return [(saga_id, first_seq + i, r) for i, r in enumerate(records)]


class StoreRaft:
    """A Raft for a driver: it never commits a proposal, always leads, and reads
    from `log`."""

    def __init__(self, log) -> None:
        self._log = log

    def apply_batch(self, batch: bytes, callback) -> None:
        pass

    def majority_heard_within(self, seconds: float) -> bool:
        return True

    @contextmanager
    def reading(self):
        yield self._log


def test_views_equal_what_the_store_would_give_and_ended_sagas_are_dropped() -> None:
    standby = Standby()
    s1, s2 = saga("s1"), saga("s2")
    standby.on_applied(applied("s1", s1[:3]))
    standby.on_applied(applied("s2", s2[:2]))
    standby.on_applied(applied("s2", s2[2:], first_seq=2))  # s2 ends
    views = standby.hand_over()
    assert set(views) == {"s1"}
    expected = SagaView.from_records("s1", s1[:3])
    view = views["s1"]
    assert view.records == expected.records
    assert view.state == expected.state
    assert view.outputs == {"a": b"out-a"}


def test_a_saga_seen_without_its_start_or_with_a_gap_is_left_to_the_store() -> None:
    standby = Standby()
    late, gap = saga("late"), saga("gap")
    standby.on_applied(applied("late", late[1:3], first_seq=1))  # started before the standby
    standby.on_applied(applied("gap", gap[:2]))
    standby.on_applied(applied("gap", gap[3:4], first_seq=3))  # position 2 never arrived
    assert standby.hand_over() == {}


def test_the_bound_holds_and_a_replaced_store_clears_every_view() -> None:
    bounded = Standby(max_sagas=2)
    for n in range(3):
        bounded.on_applied(applied(f"s{n}", saga(f"s{n}")[:1]))
    assert set(bounded.hand_over()) == {"s0", "s1"}  # s2 is read from the store at takeover

    replaced = Standby()
    replaced.on_applied(applied("s0", saga("s0")[:1]))
    replaced.reset()  # in order with the records: s0's start is forgotten
    replaced.on_applied(applied("s0", saga("s0")[1:2], first_seq=1))
    assert replaced.hand_over() == {}


def test_a_driver_adopts_the_views_and_reads_only_the_other_sagas_from_the_store() -> None:
    read: list[str] = []

    class Log:
        def in_flight(self):
            return iter(["warm", "cold"])

        def records(self, saga_id: str):
            read.append(saga_id)
            return saga(saga_id)[:2]

    standby = Standby()
    standby.on_applied(applied("warm", saga("warm")[:2]))
    calls = InMemoryCalls()
    driver = Driver(StoreRaft(Log()), epoch=2, node_id="n2", lease_s=60, participants=calls)
    driver.adopt(standby.hand_over())
    driver.step()
    assert read == ["cold"]
    assert set(driver.scheduler.runs) == {"warm", "cold"}
    # Both re-send their outstanding call to a.
    assert sorted(c.request.saga_id for c in calls.sent) == ["cold", "warm"]


def test_an_adopted_view_of_a_saga_that_ended_meanwhile_is_read_again_not_driven() -> None:
    """A stale view (the saga ended in the store, the view missed it) must not make a
    new leader call participants again: the sweep reads it from the store."""

    class Log:
        def in_flight(self):
            return iter([])  # "gone" has ended in the store

        def records(self, saga_id: str):
            return saga(saga_id)  # through EndSaga

    stale = SagaView.from_records("gone", saga("gone")[:2])  # still waits on vertex a
    calls = InMemoryCalls()
    driver = Driver(StoreRaft(Log()), epoch=2, node_id="n2", lease_s=60, participants=calls)
    driver.adopt({"gone": stale})
    driver.step()
    assert "gone" not in driver.scheduler.runs
    assert calls.sent == []
