"""The driver's permission to act (its lease, coordinator/lease.py, is tested on its
own in test_lease.py) and its call slots, with participants in memory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pysyncobj import FAIL_REASON

from coordinator.driver import Driver
from coordinator.memory_calls import InMemoryCalls


class FakeRaft:
    """Holds each proposal's callback so the test decides when and how it ends."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []

    def apply_batch(self, batch: bytes, callback: Any) -> None:
        self.callbacks.append(callback)

    def majority_heard_within(self, seconds: float) -> bool:
        return True  # answers queued during a pause look fresh: the lease is fooled

    @contextmanager
    def reading(self) -> Iterator[Any]:
        yield EmptyLog()


class EmptyLog:
    def in_flight(self) -> Iterator[str]:
        return iter(())

    def records(self, saga_id: str) -> list:
        return []


def deliver(driver: Driver) -> None:
    """Run one turn: the queued events (here, barrier commits) are handled."""
    driver.step()


def test_a_pause_withdraws_the_permission_until_a_barrier_commits() -> None:
    """The driver wires its lease to Raft: the barrier is an empty entry, and its
    commit (through the driver's queue) gives the permission back."""
    raft = FakeRaft()
    clock = [100.0]
    driver = Driver(
        raft,
        epoch=1,
        node_id="n1",
        lease_s=0.2,
        participants=InMemoryCalls(),
        monotonic=lambda: clock[0],
    )
    assert driver.lease.may_act()
    clock[0] += 1.0
    assert not driver.lease.may_act()
    assert len(raft.callbacks) == 1  # the barrier
    raft.callbacks[0](b"", FAIL_REASON.LEADER_CHANGED)
    deliver(driver)
    assert not driver.lease.may_act()
    assert len(raft.callbacks) == 2
    raft.callbacks[1](b"", FAIL_REASON.SUCCESS)
    deliver(driver)
    assert driver.lease.may_act()


def test_an_endpoint_that_never_answers_holds_only_its_share_of_the_call_slots(
    monkeypatch,
) -> None:
    """The scheduler alone: no clock, thread or network."""
    from coordinator import core
    from coordinator import scheduler as scheduler_mod
    from coordinator.scheduler import Scheduler
    from coordinator.view import SagaView
    from sagalog import records as rec

    monkeypatch.setattr(scheduler_mod, "MAX_CALLS_PER_ENDPOINT", 3)
    scheduler = Scheduler(epoch=1, started_ms=0, now=0.0)
    hanging = rec.chain_definition("v0", endpoint="127.0.0.1:9")
    other = rec.chain_definition("v0", endpoint="127.0.0.1:7")
    views = {}
    for i, definition in enumerate([hanging] * 5 + [other]):
        saga_id = f"s{i}"
        records = [rec.start_saga(saga_id, 1, definition, b""), rec.start_t(saga_id, 1, "v0", 1)]
        views[saga_id] = SagaView.from_records(saga_id, records)
    scheduler.adopt(views)
    scheduler.advance(0.0, 0, may_act=lambda: True)
    orders = scheduler.take_orders()
    assert [o.saga_id for o in orders] == ["s0", "s1", "s2", "s5"]  # three in, then held
    assert {o.endpoint for o in orders[:3]} == {"127.0.0.1:9"}
    assert list(scheduler.blocked_on["127.0.0.1:9"]) == ["s3", "s4"]
    # A reply from the hanging endpoint frees one slot: one waiting saga is re-planned.
    scheduler.dirty.clear()
    scheduler.replied(
        "s0", core.Call("v0", False, 1), core.Reply(None, error="x"), "127.0.0.1:9", 0.0, 0
    )
    assert list(scheduler.dirty) == ["s3"]
    assert scheduler.runs["s0"].waiting == {core.Call("v0", False, 1)}  # a retry timer
    assert list(scheduler.blocked_on["127.0.0.1:9"]) == ["s4"]


def test_without_permission_to_act_nothing_is_called_or_proposed() -> None:
    from coordinator.scheduler import Scheduler
    from coordinator.view import SagaView
    from sagalog import records as rec

    scheduler = Scheduler(epoch=1, started_ms=0, now=0.0)
    definition = rec.chain_definition("v0", "v1", endpoint="127.0.0.1:9")
    records = [rec.start_saga("s", 1, definition, b""), rec.start_t("s", 1, "v0", 1)]
    scheduler.adopt({"s": SagaView.from_records("s", records)})
    scheduler.advance(0.0, 0, may_act=lambda: False)
    assert scheduler.take_orders() == [] and list(scheduler.blocked) == ["s"]
    scheduler.tick(1.0, 1000, may_act=lambda: True)  # allowed again: re-planned
    scheduler.advance(1.0, 1000, may_act=lambda: True)
    [order] = scheduler.take_orders()
    assert order.request.sent_unix_ms == 1000 and order.request.epoch == 1


def test_a_long_pick_up_of_in_flight_sagas_is_not_taken_for_a_pause() -> None:
    """A new leader loading many sagas in one turn reads its clock between them: a
    turn longer than the lease is work, not a pause, and must not hold every call
    back until a confirmation commits (it did after each failover with 1,000 sagas)."""
    from contextlib import contextmanager

    from sagalog import records as rec

    definition = rec.chain_definition("v0", endpoint="127.0.0.1:9")
    ids = [f"s{i}" for i in range(8)]

    class SlowLog:
        def in_flight(self):
            return iter(ids)

        def records(self, saga_id: str):
            time.sleep(0.03)  # 8 x 30 ms: longer than the 100 ms lease in all
            return [rec.start_saga(saga_id, 1, definition, b""), rec.start_t(saga_id, 1, "v0", 1)]

    class LoadingRaft(FakeRaft):
        @contextmanager
        def reading(self):
            yield SlowLog()

    raft = LoadingRaft()
    calls = InMemoryCalls({"127.0.0.1:9": lambda compensation, request: None})  # hangs
    driver = Driver(raft, epoch=1, node_id="n1", lease_s=0.1, participants=calls)
    try:
        started = time.monotonic()
        driver.step()
        assert time.monotonic() - started > 0.1
        assert driver.stats["calls"] == len(ids)
        assert raft.callbacks == []  # no confirmation commit was asked for
    finally:
        calls.close()


def test_an_order_is_not_sent_after_a_pause_in_its_turn() -> None:
    """The scheduler ordered a call, then the turn paused (a long sweep, SIGSTOP)
    before the driver sent it: the call waits for the permission to act again, and
    when it goes it carries the time it was really sent."""
    from coordinator.view import SagaView
    from sagalog import records as rec

    clock = [100.0]
    calls = InMemoryCalls({"127.0.0.1:9": lambda compensation, request: None})
    raft = FakeRaft()
    driver = Driver(
        raft,
        epoch=1,
        node_id="n1",
        lease_s=0.2,
        participants=calls,
        monotonic=lambda: clock[0],
        now_ms=lambda: int(clock[0] * 1000),
    )
    definition = rec.chain_definition("v0", endpoint="127.0.0.1:9")
    records = [rec.start_saga("s", 1, definition, b""), rec.start_t("s", 1, "v0", 1)]
    driver.adopt({"s": SagaView.from_records("s", records)})
    driver.scheduler.advance(clock[0], int(clock[0] * 1000), driver.lease.may_act)
    orders = driver.scheduler.take_orders()
    assert len(orders) == 1
    clock[0] += 1.0  # the pause
    driver.lease.read_clock()  # a load later in the same turn reads the clock
    driver._send(orders)
    assert calls.sent == [] and list(driver.scheduler.blocked) == ["s"]
    assert driver.scheduler.calls_in_flight == 0 and len(raft.callbacks) == 1  # a barrier
    raft.callbacks[0](b"", FAIL_REASON.SUCCESS)
    driver.scheduler.next_sweep = float("inf")
    driver.step()  # the barrier commits; the blocked saga is re-planned and called
    [sent] = calls.sent
    assert sent.request.sent_unix_ms == 101_000
