"""Back-pressure: Submit refuses new sagas while the coordinator is behind."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import grpc
import pytest
from saga.v1 import log_pb2, sagas_pb2
from test_driver_lease import FakeRaft

from cluster.runtime.sagas_service import MAX_COORDINATOR_LAG_S, Call, Refusal, SagasService
from coordinator import admission
from coordinator.admission import AdmissionLimit
from coordinator.driver import Driver
from sagalog import codec
from sagalog import records as rec


def test_the_driver_reports_how_long_events_waited_for_it() -> None:
    clock = [100.0]
    driver = Driver(FakeRaft(), epoch=1, node_id="n1", monotonic=lambda: clock[0], turn_wait_s=0.0)
    driver.scheduler.next_sweep = float("inf")  # no store behind this fake
    assert driver.lag_s() == 0.0
    driver._post(("wake",))
    clock[0] += 0.8  # it waited 0.8 s for the driver
    driver.step()
    assert driver.lag_s() == pytest.approx(0.8)
    driver._post(("wake",))
    driver.step()
    assert driver.lag_s() == 0.0  # caught up


class _Aborted(Exception):
    pass


class _Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted

    def invocation_metadata(self) -> list:
        return []

    def time_remaining(self) -> float | None:
        return None


class _Node:
    def __init__(self, lag_s: float, in_flight: int = 0) -> None:
        self.lag = lag_s
        self.in_flight = in_flight
        self.raft = SimpleNamespace()
        self.proposer = None  # a Submit that got past admission would fail here
        self.feed = None

    def office_epoch(self) -> int:
        return 1

    def sagas_in_flight(self) -> int:
        return self.in_flight

    def saga_limit(self) -> int:
        return 100

    def coordinator_lag_s(self) -> float:
        return self.lag

    def leader_grpc_addr(self) -> str:
        return "127.0.0.1:1"

    def is_leader(self) -> bool:
        return True


@pytest.mark.parametrize("lag_s", [MAX_COORDINATOR_LAG_S + 0.1, 0.0])
def test_submit_is_resource_exhausted_only_while_the_coordinator_lags(lag_s: float) -> None:
    service = SagasService(_Node(lag_s))  # type: ignore[arg-type]
    context = _Context()
    request = sagas_pb2.SubmitRequest(definition=rec.chain_definition("a"), saga_id="s1")
    with pytest.raises(_Aborted):
        asyncio.run(service.Submit(request, context))
    if lag_s > MAX_COORDINATOR_LAG_S:
        assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "behind" in context.details
    else:  # admitted: it went on to propose (no proposer here: "starting")
        assert context.code == grpc.StatusCode.UNAVAILABLE


def test_submit_is_resource_exhausted_at_the_saga_limit() -> None:
    service = SagasService(_Node(0.0, in_flight=100))  # type: ignore[arg-type]
    context = _Context()
    request = sagas_pb2.SubmitRequest(definition=rec.chain_definition("a"), saga_id="s1")
    with pytest.raises(_Aborted):
        asyncio.run(service.Submit(request, context))
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit is 100" in context.details


class _BlockingProposer:
    """Holds every proposal until released, then answers ACCEPTED."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def propose(self, batch: bytes, timeout_s: float) -> log_pb2.BatchResult:
        self.entered.release()
        self.release.wait(10)
        records, _ = codec.decode_batch(batch)
        return log_pb2.BatchResult(
            results=[log_pb2.RecordResult(verdict=log_pb2.ACCEPTED) for _ in records]
        )


def test_submits_not_answered_yet_count_toward_the_limit() -> None:
    """A burst let through between two applies must not overshoot the limit: the
    coordinator counts a saga only once its StartSaga applied."""
    node = _Node(0.0, in_flight=98)  # the limit is 100
    node.proposer = _BlockingProposer()  # type: ignore[assignment]
    service = SagasService(node)  # type: ignore[arg-type]
    call = Call(forwarded=False, deadline=None)
    definition = rec.chain_definition("a")
    held = [
        threading.Thread(
            target=service.submit,
            args=(sagas_pb2.SubmitRequest(definition=definition, saga_id=f"s{i}"), call),
        )
        for i in range(2)
    ]
    for t in held:
        t.start()
    for _ in held:
        assert node.proposer.entered.acquire(timeout=10)
    with pytest.raises(Refusal) as refused:  # 98 in flight + 2 admitted = the limit
        service.submit(sagas_pb2.SubmitRequest(definition=definition, saga_id="s3"), call)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    node.proposer.release.set()
    for t in held:
        t.join(10)
    reply = service.submit(sagas_pb2.SubmitRequest(definition=definition, saga_id="s4"), call)
    assert reply.created  # answered Submits no longer count


# ---- AdmissionLimit ---------------------------------------------------------------------


def run_periods(
    a: AdmissionLimit, t: float, periods: int, latency_s: float, in_flight: int
) -> float:
    """`periods` update periods in which 10 sagas ended with `latency_s` each."""
    for _ in range(periods):
        for _ in range(10):
            a.on_ended(latency_s)
        t += admission.UPDATE_S
        a.update(t, in_flight)
    return t


def test_the_limit_falls_while_sagas_are_slower_than_allowed() -> None:
    a = AdmissionLimit(0.0, initial=5000)
    t = run_periods(a, 0.0, 3, 0.02, in_flight=4000)  # the no-queue latency: 20 ms
    assert a.allowed_latency_s() == admission.LATENCY_FLOOR_S
    start = a.limit
    t = run_periods(a, t, 3, 2.0, in_flight=a.limit)  # a queue: 2 s each
    assert a.limit < start * 0.5
    run_periods(a, t, 30, 2.0, in_flight=a.limit)
    assert a.limit == admission.MIN_LIMIT


def test_the_limit_grows_fast_when_latency_is_low_but_not_past_twice_the_load() -> None:
    a = AdmissionLimit(0.0)
    t = run_periods(a, 0.0, 1, 0.02, in_flight=a.limit)
    assert a.limit == int(admission.MIN_LIMIT * admission.INCREASE) + 1
    t = run_periods(a, t, 20, 0.02, in_flight=300)
    assert a.limit == 600  # twice the sagas that were in flight
    run_periods(a, t, 20, 0.02, in_flight=2)
    assert a.limit == admission.MIN_LIMIT  # an idle cluster banks no large limit


def test_too_few_ended_sagas_change_nothing_unless_the_limit_is_full() -> None:
    a = AdmissionLimit(0.0, initial=1000)
    a.on_ended(30.0)
    a.update(admission.UPDATE_S, 800)
    assert a.limit == 1000
    # Full and nothing ends: sagas wait on a stopped participant, not on us.
    a.update(2 * admission.UPDATE_S, 1000)
    assert a.limit == 1501


def test_slow_participants_raise_the_allowed_latency() -> None:
    """Sagas that take 4 s each with no queue are not throttled for long."""
    a = AdmissionLimit(0.0, initial=400)
    t = run_periods(a, 0.0, 1, 4.0, in_flight=400)  # judged against the floor: cut
    assert a.limit < 400
    assert a.allowed_latency_s() == 8.0
    low = a.limit
    run_periods(a, t, 10, 4.0, in_flight=a.limit)
    assert a.limit > low


def test_a_few_fast_sagas_among_slow_ones_do_not_pin_the_limit() -> None:
    """One saga in ten takes 20 ms, the rest 400 ms, nothing queued: not overload."""
    a = AdmissionLimit(0.0, initial=1000)
    t = 0.0
    for _ in range(100):
        for i in range(20):
            a.on_ended(0.02 if i % 10 == 0 else 0.4)
        t += admission.UPDATE_S
        a.update(t, a.limit)
    assert a.limit > 1000


def test_resumed_sagas_count_as_ending_but_give_no_latency() -> None:
    """After a failover the sagas that end started under the old leader: the limit
    neither treats the cluster as stuck (growing without bound) nor judges latency."""
    a = AdmissionLimit(0.0, initial=1000)
    for period in range(1, 11):
        for _ in range(50):
            a.on_ended(None)
        a.update(period * admission.UPDATE_S, 1000)
    assert a.limit == 1000
