"""The travel booking participant (the SDK plus fault knobs), over gRPC.

Most tests run the participant's gRPC server inside the test process on port 0;
the durability tests run real `saga-participant` processes and kill -9 them. The
SDK's own guarantees are proven in test_participant_sdk.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from saga.v1 import participant_pb2, participant_pb2_grpc

from cluster.grpcutil import channel_to
from cluster.participant import Call
from cluster.participant.ledger import (
    ANSWER_OK,
    ANSWER_REFUSED,
    COMPENSATED,
    IN_EFFECT,
    LATE_REQUEST_ERROR,
    OUTCOME_COMPENSATED,
    OUTCOME_NOTHING_TO_UNDO,
    OUTCOME_TOMBSTONED,
    REFUSED,
)
from cluster.testkit.booking import (
    ANSWER_CRASH,
    ANSWER_HANG,
    ANSWER_UNAVAILABLE,
    CANCELLED,
    BookingConfig,
    BookingServer,
    FaultDecider,
    Faults,
    main,
    parse_args,
    read_state,
)
from cluster.testkit.travel import TRAVEL_SERVICES, TravelParticipants, travel_definition


def request_key(saga_id: str, vertex: str) -> str:
    return f"{saga_id}/{vertex}/request"


def compensation_key(saga_id: str, vertex: str) -> str:
    return f"{saga_id}/{vertex}/compensation"


def execute(
    stub: Any, saga_id: str, vertex: str = "Hotel", attempt: int = 1, epoch: int = 1, **kw: Any
) -> Any:
    key = request_key(saga_id, vertex)
    return stub.Execute(
        participant_pb2.StepRequest(
            saga_id=saga_id,
            vertex=vertex,
            action=f"Book{vertex}",
            payload=b"{}",
            idempotency_key=key,
            request_key=key,
            attempt=attempt,
            epoch=epoch,
        ),
        timeout=kw.get("timeout", 5.0),
    )


def compensate(
    stub: Any, saga_id: str, vertex: str = "Hotel", attempt: int = 1, epoch: int = 1, **kw: Any
) -> Any:
    return stub.Compensate(
        participant_pb2.StepRequest(
            saga_id=saga_id,
            vertex=vertex,
            action=f"Cancel{vertex}",
            idempotency_key=compensation_key(saga_id, vertex),
            request_key=request_key(saga_id, vertex),
            attempt=attempt,
            epoch=epoch,
        ),
        timeout=kw.get("timeout", 5.0),
    )


class InProcess:
    """A participant server in this process and a stub to it."""

    def __init__(self, server: BookingServer) -> None:
        self.server = server
        self.channel = channel_to(server.address)
        self.stub = participant_pb2_grpc.ParticipantStub(self.channel)
        self.db_path = server.config.db_path

    def state(self) -> Any:
        return read_state(self.db_path)


@pytest.fixture
def make_participant(tmp_path) -> Iterator[Callable[..., InProcess]]:
    started: list[InProcess] = []

    def make(**faults: Any) -> InProcess:
        config = BookingConfig(
            name="Hotel",
            addr="127.0.0.1:0",
            data_dir=str(tmp_path / f"p{len(started)}"),
            faults=Faults(seed=7, **faults),
        )
        server = BookingServer(config)
        server.start()
        started.append(InProcess(server))
        return started[-1]

    yield make
    for p in started:
        p.channel.close()
        p.server.stop(grace_s=0.2)


# ---- requests and compensations ---------------------------------------------------------


def test_execute_is_idempotent_per_key(make_participant) -> None:
    hotel = make_participant()
    first = execute(hotel.stub, "trip-1", attempt=1)
    again = execute(hotel.stub, "trip-1", attempt=2)
    other = execute(hotel.stub, "trip-2")
    assert first.ok and first.output.startswith(b"HOTEL-")
    assert again == first  # the first answer, not a second booking
    assert other.ok and other.output != first.output
    state = hotel.state()
    assert [b.request_key for b in state.in_effect()] == [
        request_key("trip-1", "Hotel"),
        request_key("trip-2", "Hotel"),
    ]
    calls = state.calls_for(request_key("trip-1", "Hotel"))
    assert [(c.kind, c.attempt, c.answer, c.output) for c in calls] == [
        ("execute", 1, ANSWER_OK, first.output),
        ("execute", 2, ANSWER_OK, first.output),
    ]


def test_compensation_before_its_request_leaves_a_tombstone(make_participant) -> None:
    hotel = make_participant()
    undo = compensate(hotel.stub, "trip-1")
    assert undo.ok and undo.output == OUTCOME_TOMBSTONED.encode()
    late = execute(hotel.stub, "trip-1")
    assert not late.ok and late.error == LATE_REQUEST_ERROR
    assert execute(hotel.stub, "trip-1", attempt=2) == late  # still refused, same answer
    state = hotel.state()
    key = request_key("trip-1", "Hotel")
    assert state.in_effect() == []
    assert state.requests[key].status == REFUSED and state.bookings == []
    tombstone = state.tombstones[key]
    assert tombstone.compensation_key == compensation_key("trip-1", "Hotel")
    assert tombstone.late_request_at is not None  # the late request was seen and refused


def test_compensation_cancels_a_booking_and_is_idempotent(make_participant) -> None:
    hotel = make_participant()
    booked = execute(hotel.stub, "trip-1")
    first = compensate(hotel.stub, "trip-1", attempt=1)
    again = compensate(hotel.stub, "trip-1", attempt=2)
    assert first.ok and first.output == OUTCOME_COMPENSATED.encode()
    assert again == first
    state = hotel.state()
    request = state.requests[request_key("trip-1", "Hotel")]
    assert request.status == COMPENSATED and request.output == booked.output  # row kept
    assert request.compensated_by == compensation_key("trip-1", "Hotel")
    assert request.compensated_at is not None and request.compensated_at >= request.decided_at
    [booking] = state.bookings
    assert booking.status == CANCELLED and booked.output == f"HOTEL-{booking.id:06d}".encode()
    assert len(state.compensations) == 1 and state.tombstones == {}
    # A repeat of the request after its compensation still gets its first answer
    # and books nothing new.
    assert execute(hotel.stub, "trip-1", attempt=3) == booked
    assert hotel.state().in_effect() == []


def test_refuse_saga_substring_refuses_only_those_sagas(make_participant) -> None:
    hotel = make_participant(refuse_saga_substring="doomed")
    refused = execute(hotel.stub, "trip-doomed-1")
    assert not refused.ok and "doomed" in refused.error
    assert execute(hotel.stub, "trip-doomed-1", attempt=2) == refused
    assert execute(hotel.stub, "trip-fine-1").ok
    nothing = compensate(hotel.stub, "trip-doomed-1")
    assert nothing.ok and nothing.output == OUTCOME_NOTHING_TO_UNDO.encode()
    state = hotel.state()
    assert state.requests[request_key("trip-doomed-1", "Hotel")].status == REFUSED
    assert [b.saga_id for b in state.bookings] == ["trip-fine-1"]
    assert [c.answer for c in state.calls_for(request_key("trip-doomed-1", "Hotel"))] == [
        ANSWER_REFUSED,
        ANSWER_REFUSED,
        ANSWER_OK,  # the compensation
    ]


def test_read_state_reports_calls_with_epochs_and_attempts(make_participant) -> None:
    hotel = make_participant()
    execute(hotel.stub, "trip-1", attempt=1, epoch=3)
    execute(hotel.stub, "trip-1", attempt=2, epoch=4)  # a new leader retried it
    compensate(hotel.stub, "trip-1", attempt=1, epoch=4)
    calls = hotel.state().calls
    assert [(c.kind, c.epoch, c.attempt) for c in calls] == [
        ("execute", 3, 1),
        ("execute", 4, 2),
        ("compensate", 4, 1),
    ]
    assert [c.id for c in calls] == sorted(c.id for c in calls)
    assert all(c.saga_id == "trip-1" and c.vertex == "Hotel" for c in calls)
    assert calls[2].idempotency_key == compensation_key("trip-1", "Hotel")
    assert calls[2].request_key == request_key("trip-1", "Hotel")


# ---- fault knobs -----------------------------------------------------------------------


def test_transport_error_knob_is_unavailable_and_does_nothing(make_participant) -> None:
    hotel = make_participant(transport_error_rate=1.0)
    with pytest.raises(grpc.RpcError) as err:
        execute(hotel.stub, "trip-1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    state = hotel.state()
    assert state.bookings == [] and state.requests == {}
    assert [c.answer for c in state.calls] == [ANSWER_UNAVAILABLE]


def test_compensate_error_knob_fails_only_compensations(make_participant) -> None:
    hotel = make_participant(compensate_error_rate=1.0)
    assert execute(hotel.stub, "trip-1").ok
    for attempt in (1, 2, 3):
        with pytest.raises(grpc.RpcError) as err:
            compensate(hotel.stub, "trip-1", attempt=attempt)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    [booking] = hotel.state().bookings_for(request_key("trip-1", "Hotel"))
    assert booking.status == IN_EFFECT


def test_hang_knob_with_a_short_deadline_is_deadline_exceeded(make_participant) -> None:
    hotel = make_participant(hang_rate=1.0)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        execute(hotel.stub, "trip-1", timeout=0.3)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 5
    state = hotel.state()
    assert state.bookings == [] and [c.answer for c in state.calls] == [ANSWER_HANG]


def test_seeded_fault_decisions_are_repeatable() -> None:
    faults = Faults(refuse_rate=0.5, hang_rate=0.5, seed=42)
    calls = [
        Call("execute", f"trip-{i}", "Hotel", "BookHotel", f"k{i}", f"k{i}", 1, 1)
        for i in range(200)
    ]

    def decisions(decider: FaultDecider) -> list[tuple[bool, bool]]:
        # A Call has the fields a refusal reads from a Step.
        return [(decider.refusal("Hotel", c) is not None, decider.hang(c)) for c in calls]  # type: ignore[arg-type]

    first = decisions(FaultDecider(faults))
    assert first == decisions(FaultDecider(faults))
    assert 50 < sum(refused for refused, _ in first) < 150  # about half


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--refuse-rate", "1.5"], "--refuse-rate"),
        (["--hang-rate", "-0.1"], "--hang-rate"),
        (["--transport-error-rate", "nan"], "--transport-error-rate"),
        (["--latency-ms", "-1"], "--latency-ms"),
        (["--crash-after-calls", "-2"], "--crash-after-calls"),
        (["--fault-point", "sometimes"], "--fault-point"),
        (["--name", "no/slash"], "--name"),
        (["--addr", "nowhere"], "HOST:PORT"),
    ],
)
def test_bad_knobs_get_clear_errors(tmp_path, flags, needle, capsys) -> None:
    base = ["--name", "Hotel", "--addr", "127.0.0.1:1", "--data-dir", str(tmp_path)]
    with pytest.raises(ValueError, match=needle):
        parse_args(base + flags)
    assert main(base + flags) == 2
    assert needle in capsys.readouterr().err


# ---- travel definition and real processes ----------------------------------------------


def test_travel_definition_is_three_in_parallel_then_payment() -> None:
    endpoints = {name: f"127.0.0.1:{9000 + i}" for i, name in enumerate(TRAVEL_SERVICES)}
    definition = travel_definition(endpoints, timeout_ms=500, max_attempts=4)
    by_name = {v.name: v for v in definition.vertices}
    assert list(by_name) == list(TRAVEL_SERVICES)
    assert (by_name["Payment"].request, by_name["Payment"].compensation) == ("Charge", "Refund")
    assert (by_name["Car"].request, by_name["Car"].compensation) == ("BookCar", "CancelCar")
    assert list(by_name["Payment"].depends_on) == ["Hotel", "Car", "Flight"]
    assert all(not by_name[n].depends_on for n in ("Hotel", "Car", "Flight"))
    assert all(v.endpoint == endpoints[v.name] for v in definition.vertices)
    assert {(v.timeout_ms, v.max_attempts) for v in definition.vertices} == {(500, 4)}
    backoff = by_name["Hotel"].backoff
    assert (backoff.initial_ms, backoff.max_ms, backoff.multiplier) == (50, 1000, 2.0)
    with pytest.raises(ValueError, match="missing"):
        travel_definition({"Hotel": "127.0.0.1:1"})


@pytest.fixture
def travel(tmp_path) -> Iterator[Callable[..., TravelParticipants]]:
    made: list[TravelParticipants] = []

    def make(**kwargs: Any) -> TravelParticipants:
        made.append(TravelParticipants(str(tmp_path / "travel"), **kwargs))
        made[-1].start_all()
        made[-1].wait_ready(timeout_s=20)
        return made[-1]

    yield make
    for participants in made:
        participants.stop_all()
        print(participants.logs(40))  # pytest shows it only if the test failed


@pytest.mark.cluster
def test_state_survives_kill_9_and_a_crash_after_the_effect(travel) -> None:
    """Real processes. Hotel is killed -9 after booking; Flight crashes on purpose
    after its booking is durable but before answering. Both come back on the same
    port and answer retries with the first answer, never booking twice."""
    participants = travel(
        extra_args={"Flight": ["--crash-after-calls", "1", "--fault-point", "after-effect"]}
    )
    channels = {name: channel_to(addr) for name, addr in participants.endpoints.items()}
    stubs = {name: participant_pb2_grpc.ParticipantStub(ch) for name, ch in channels.items()}
    hotel = execute(stubs["Hotel"], "trip-1", "Hotel")
    assert hotel.ok and execute(stubs["Car"], "trip-1", "Car").ok
    with pytest.raises(grpc.RpcError) as err:
        execute(stubs["Flight"], "trip-1", "Flight")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the process died mid-request
    participants.procs["Flight"].wait(timeout=10)
    assert not participants.alive("Flight")

    old_pid = participants.pid("Hotel")
    participants.kill("Hotel")  # SIGKILL
    participants.restart("Hotel")
    participants.restart("Flight", extra_args=[])  # back without the crash knob
    participants.wait_ready(timeout_s=20, names=["Hotel", "Flight"])
    assert participants.pid("Hotel") != old_pid

    assert execute(stubs["Hotel"], "trip-1", "Hotel", attempt=2, epoch=2) == hotel
    flight = execute(stubs["Flight"], "trip-1", "Flight", attempt=2, epoch=2)
    assert flight.ok  # the booking made before the crash, not a new one
    assert compensate(stubs["Hotel"], "trip-1", "Hotel", epoch=2).ok

    hotel_state = participants.state("Hotel")
    [hotel_booking] = hotel_state.bookings_for(request_key("trip-1", "Hotel"))
    assert hotel_booking.status == CANCELLED
    assert [(c.attempt, c.epoch) for c in hotel_state.calls if c.kind == "execute"] == [
        (1, 1),
        (2, 2),
    ]
    flight_state = participants.state("Flight")
    assert len(flight_state.bookings) == 1
    assert flight_state.requests[request_key("trip-1", "Flight")].output == flight.output
    # The booking committed, then the process died before answering; the retry
    # got the first answer.
    assert [c.answer for c in flight_state.calls] == [ANSWER_OK, ANSWER_CRASH, ANSWER_OK]

    for channel in channels.values():
        channel.close()
    participants.stop_all()
    assert {name: proc.returncode for name, proc in participants.procs.items()} == {
        name: 0 for name in TRAVEL_SERVICES
    }  # SIGTERM stops them cleanly
    assert participants.logs().count("participant Hotel listening on") == 2
