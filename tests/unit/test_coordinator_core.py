"""The coordinator's pure core, driven against the real Saga Log on an in-memory KV."""

from __future__ import annotations

from saga.v1 import log_pb2

from coordinator import core
from coordinator.view import SagaView
from sagalog import codec
from sagalog import records as rec
from sagalog.definition import check_definition
from sagalog.kv import MemoryKV
from sagalog.log import SagaLog

EPOCH = 1


def travel() -> log_pb2.SagaDefinition:
    return rec.travel_shaped_definition(endpoint="127.0.0.1:1", max_attempts=2)


class Harness:
    def __init__(self, started: bool = True) -> None:
        self.log = SagaLog(MemoryKV())
        self.index = 0
        self.commit([rec.epoch(EPOCH, "n1")])
        if started:
            self.commit([rec.start_saga("s", EPOCH, travel(), b"p")])

    def commit(self, records: list[log_pb2.Record]) -> log_pb2.BatchResult:
        self.index += 1
        result = log_pb2.BatchResult()
        result.ParseFromString(self.log.apply_batch(codec.encode_batch(records), self.index))
        return result

    def view(self) -> SagaView:
        return SagaView.from_records("s", self.log.records("s"))

    def plan(self) -> core.Plan:
        plan = core.plan(self.view(), EPOCH, 0)
        if plan.records:
            result = self.commit(plan.records)
            assert all(r.verdict == log_pb2.ACCEPTED for r in result.results), result
        return plan

    def reply(self, call: core.Call, reply: core.Reply) -> core.Response:
        response = core.on_reply(self.view(), call, reply, EPOCH, 0)
        if response.records:
            result = self.commit(response.records)
            assert all(r.verdict == log_pb2.ACCEPTED for r in result.results), result
        return response

    def decide(self, call: core.Call, reply: core.Reply) -> tuple[core.Response, core.Plan]:
        """What the driver proposes for a reply, not committed: the reply's records
        and what follows them in the same entry."""
        view = self.view()
        response = core.on_reply(view, call, reply, EPOCH, 0)
        return response, core.plan_ahead(view, response.records, EPOCH, 0)

    def kinds(self) -> list[str]:
        return [r.WhichOneof("body") for r in self.log.records("s")]


def calls(plan: core.Plan) -> set[tuple[str, bool, int]]:
    return {(c.vertex, c.compensation, c.attempt) for c in plan.calls}


def test_parallel_roots_start_together_then_payment_then_end() -> None:
    h = Harness()
    first = h.plan()
    assert {r.start_t.vertex for r in first.records} == {"Hotel", "Car", "Flight"}
    assert calls(h.plan()) == {("Hotel", False, 1), ("Car", False, 1), ("Flight", False, 1)}
    for v in ("Hotel", "Car", "Flight"):
        h.reply(core.Call(v, False, 1), core.Reply(True, f"{v}-1".encode()))
    h.plan()
    assert calls(h.plan()) == {("Payment", False, 1)}
    h.reply(core.Call("Payment", False, 1), core.Reply(True, b"P"))
    h.plan()
    assert h.view().outcome == log_pb2.OUTCOME_COMPLETED


def test_business_failure_aborts_and_compensates_every_started_vertex() -> None:
    h = Harness()
    h.plan()
    h.reply(core.Call("Hotel", False, 1), core.Reply(True, b"H"))
    h.reply(core.Call("Car", False, 1), core.Reply(False, error="no cars"))
    # Flight has a StartT and no reply: it may have taken effect, so it is compensated too.
    plan = h.plan()
    assert {r.start_c.vertex for r in plan.records} == {"Hotel", "Car", "Flight"}
    assert calls(h.plan()) == {("Hotel", True, 1), ("Car", True, 1), ("Flight", True, 1)}
    for v in ("Hotel", "Car", "Flight"):
        h.reply(core.Call(v, True, 1), core.Reply(True))
    h.plan()
    assert h.view().outcome == log_pb2.OUTCOME_ABORTED
    assert "no cars" in h.view().abort_reason


def test_a_late_reply_after_abort_is_logged_and_not_retried() -> None:
    h = Harness()
    h.plan()
    h.reply(core.Call("Car", False, 1), core.Reply(False, error="no"))
    h.plan()
    h.reply(core.Call("Hotel", False, 1), core.Reply(True, b"H-late"))
    assert h.view().outputs["Hotel"] == b"H-late"
    assert h.reply(core.Call("Flight", False, 1), core.Reply(None, error="timeout")).records == []


def test_transport_failures_retry_with_logged_attempts_then_abort() -> None:
    h = Harness()
    h.plan()
    response = h.reply(core.Call("Hotel", False, 1), core.Reply(None, error="UNAVAILABLE"))
    assert response.retry_after_ms is not None and not response.records
    retry = core.retry(h.view(), core.Call("Hotel", False, 1), EPOCH, 0)
    assert retry is not None and retry[0].start_t.attempt == 2
    h.commit(retry)
    assert ("Hotel", False, 2) in calls(h.plan())
    # The second attempt is the last (max_attempts=2): the saga aborts.
    h.reply(core.Call("Hotel", False, 2), core.Reply(None, error="DEADLINE_EXCEEDED"))
    assert h.view().phase.value == "ABORTING"
    assert log_pb2.TRANSPORT_EXHAUSTED in [
        r.fail_t.kind for r in h.log.records("s") if r.HasField("fail_t")
    ]


def test_a_stale_reply_changes_nothing() -> None:
    h = Harness()
    h.plan()
    h.reply(core.Call("Hotel", False, 1), core.Reply(True, b"H"))
    before = h.kinds()
    assert h.reply(core.Call("Hotel", False, 1), core.Reply(True, b"H")).records == []
    assert h.reply(core.Call("Hotel", False, 7), core.Reply(None)).records == []
    assert h.kinds() == before


def test_compensation_goes_in_reverse_dependency_order() -> None:
    h = Harness()
    h.plan()
    for v in ("Hotel", "Car", "Flight"):
        h.reply(core.Call(v, False, 1), core.Reply(True, b"x"))
    h.plan()  # StartT(Payment)
    h.reply(core.Call("Payment", False, 1), core.Reply(False, error="card declined"))
    first = h.plan()
    assert [r.start_c.vertex for r in first.records] == ["Payment"]
    h.reply(core.Call("Payment", True, 1), core.Reply(True))
    second = h.plan()
    assert {r.start_c.vertex for r in second.records} == {"Hotel", "Car", "Flight"}


def test_a_failing_compensation_backs_off_is_marked_stuck_and_keeps_going() -> None:
    h = Harness()
    h.plan()
    h.reply(core.Call("Hotel", False, 1), core.Reply(False, error="no"))
    h.plan()
    attempt = 1
    delays = []
    for _ in range(core.MAX_LOGGED_COMPENSATION_ATTEMPTS + 3):
        call = core.Call("Hotel", True, attempt)
        response = h.reply(call, core.Reply(None, error="down"))
        delays.append(response.retry_after_ms)
        records = core.retry(h.view(), call, EPOCH, 0)
        assert records is not None
        if records:
            h.commit(records)
            attempt = h.view().state.vertices["Hotel"].comp_attempt
    assert max(d or 0 for d in delays) <= core.COMPENSATION_BACKOFF_CAP_MS
    assert h.view().state.stuck
    assert attempt == core.MAX_LOGGED_COMPENSATION_ATTEMPTS  # the log stops growing
    h.reply(core.Call("Hotel", True, attempt), core.Reply(True))
    assert not h.view().state.stuck


def test_an_oversized_output_aborts_with_a_clear_reason() -> None:
    h = Harness()
    h.plan()
    big = b"x" * (codec.MAX_OUTPUT_BYTES + 1)
    h.reply(core.Call("Hotel", False, 1), core.Reply(True, big))
    assert h.view().phase.value == "ABORTING"
    assert "limit" in h.view().abort_reason


def test_idempotency_keys_are_stable_and_a_compensation_names_its_request() -> None:
    h = Harness()
    h.plan()
    view = h.view()
    first = core.step_request(view, core.Call("Hotel", False, 1), epoch=1)
    again = core.step_request(view, core.Call("Hotel", False, 3), epoch=9)
    undo = core.step_request(view, core.Call("Hotel", True, 1), epoch=9)
    assert first.idempotency_key == again.idempotency_key == undo.request_key
    assert undo.idempotency_key != first.idempotency_key
    assert (again.attempt, again.epoch, undo.action) == (3, 9, "CancelHotel")


def test_definition_checks_name_the_problem() -> None:
    good = travel()
    assert check_definition(good) == ""
    cases = {
        "no vertices": log_pb2.SagaDefinition(name="x"),
        "cycle": log_pb2.SagaDefinition(
            vertices=[
                log_pb2.Vertex(name="a", endpoint="h:1", request="r", compensation="c",
                               depends_on=["b"]),
                log_pb2.Vertex(name="b", endpoint="h:1", request="r", compensation="c",
                               depends_on=["a"]),
            ]
        ),
        "unknown": log_pb2.SagaDefinition(
            vertices=[log_pb2.Vertex(name="a", endpoint="h:1", request="r", compensation="c",
                                     depends_on=["zz"])]
        ),
        "duplicate": log_pb2.SagaDefinition(
            vertices=[log_pb2.Vertex(name="a", endpoint="h:1", request="r", compensation="c")] * 2
        ),
        "empty name": log_pb2.SagaDefinition(
            vertices=[log_pb2.Vertex(endpoint="h:1", request="r", compensation="c")]
        ),
        "endpoint": log_pb2.SagaDefinition(
            vertices=[log_pb2.Vertex(name="a", endpoint="nowhere", request="r", compensation="c")]
        ),
        "timeout_ms": log_pb2.SagaDefinition(
            vertices=[log_pb2.Vertex(name="a", endpoint="h:1", request="r", compensation="c",
                                     timeout_ms=10**7)]
        ),
        "max_attempts": log_pb2.SagaDefinition(
            vertices=[log_pb2.Vertex(name="a", endpoint="h:1", request="r", compensation="c",
                                     max_attempts=1000)]
        ),
    }  # fmt: skip
    for needle, definition in cases.items():
        assert needle in check_definition(definition), (needle, check_definition(definition))
    too_many = log_pb2.SagaDefinition(
        vertices=[
            log_pb2.Vertex(name=f"v{i}", endpoint="h:1", request="r", compensation="c")
            for i in range(codec.MAX_VERTICES + 1)
        ]
    )
    assert "limit" in check_definition(too_many)


# ---- records decided together are logged together (plan_ahead) ----------------------


def body_names(records: list[log_pb2.Record]) -> list[tuple[str, str]]:
    return [
        (r.WhichOneof("body"), getattr(getattr(r, r.WhichOneof("body")), "vertex", ""))
        for r in records
    ]


def commit_all(h: Harness, records: list[log_pb2.Record]) -> None:
    result = h.commit(records)
    assert [r.verdict for r in result.results] == [log_pb2.ACCEPTED] * len(records), result


def test_the_travel_saga_needs_three_entries_on_its_critical_path() -> None:
    h = Harness(started=False)
    start = rec.start_saga("s", EPOCH, travel(), b"p")
    opening = core.plan_ahead(SagaView("s"), [start], EPOCH, 0)
    # Entry 1: StartSaga with the roots' StartT; nothing is called before it commits.
    assert body_names(opening.records) == [("start_t", v) for v in ("Hotel", "Car", "Flight")]
    assert opening.calls == []
    commit_all(h, [start, *opening.records])
    assert calls(core.plan_ahead(h.view(), [], EPOCH, 0)) == {
        ("Hotel", False, 1),
        ("Car", False, 1),
        ("Flight", False, 1),
    }
    for v in ("Hotel", "Car"):  # replies that unblock nothing yet: their EndT alone
        response = h.reply(core.Call(v, False, 1), core.Reply(True, v.encode()))
        assert core.plan_ahead(h.view(), [], EPOCH, 0).records == []
        assert len(response.records) == 1
    # Entry 2: the last EndT Payment waits for, with Payment's StartT.
    end_flight, following = h.decide(core.Call("Flight", False, 1), core.Reply(True, b"F"))
    assert body_names(following.records) == [("start_t", "Payment")]
    assert calls(following) == set()  # Payment's StartT is not committed yet
    commit_all(h, end_flight.records + following.records)
    assert calls(core.plan_ahead(h.view(), [], EPOCH, 0)) == {("Payment", False, 1)}
    # Entry 3: Payment's EndT with EndSaga.
    end_payment, closing = h.decide(core.Call("Payment", False, 1), core.Reply(True, b"P"))
    assert body_names(closing.records) == [("end_saga", "")]
    commit_all(h, end_payment.records + closing.records)
    assert h.view().outcome == log_pb2.OUTCOME_COMPLETED


def test_a_refusal_starts_its_compensations_in_its_entry_and_the_last_end_c_ends_the_saga() -> None:
    h = Harness()
    h.plan()
    h.reply(core.Call("Hotel", False, 1), core.Reply(True, b"H"))
    h.reply(core.Call("Flight", False, 1), core.Reply(True, b"F"))
    refused, following = h.decide(core.Call("Car", False, 1), core.Reply(False, error="no cars"))
    # Every started vertex (Car's request may have taken effect) is compensated.
    assert sorted(body_names(following.records)) == [
        ("start_c", "Car"),
        ("start_c", "Flight"),
        ("start_c", "Hotel"),
    ]
    assert following.calls == []  # the StartC are not committed yet
    commit_all(h, refused.records + following.records)
    for v in ("Hotel", "Car"):
        h.reply(core.Call(v, True, 1), core.Reply(True))
    last, closing = h.decide(core.Call("Flight", True, 1), core.Reply(True))
    assert body_names(closing.records) == [("end_saga", "")]
    commit_all(h, last.records + closing.records)
    assert h.view().outcome == log_pb2.OUTCOME_ABORTED


def test_nothing_is_chained_to_a_record_the_log_would_refuse() -> None:
    h = Harness()
    h.plan()
    # An EndT for Payment, which never started: the log refuses it, so no EndSaga.
    bogus = rec.end_t("s", EPOCH, "Payment", b"P")
    following = core.plan_ahead(h.view(), [bogus], EPOCH, 0)
    assert following.records == []
    # The committed StartT still ask for their calls.
    assert {c.vertex for c in following.calls} == {"Hotel", "Car", "Flight"}


def test_a_call_whose_retry_is_proposed_is_not_sent_under_the_old_attempt() -> None:
    h = Harness()
    h.plan()
    retry = core.retry(h.view(), core.Call("Hotel", False, 1), EPOCH, 0)
    assert retry is not None and len(retry) == 1
    plan = core.plan_ahead(h.view(), retry, EPOCH, 0)
    assert ("Hotel", False, 1) not in calls(plan) and ("Hotel", False, 2) not in calls(plan)
    commit_all(h, retry)
    assert ("Hotel", False, 2) in calls(core.plan_ahead(h.view(), [], EPOCH, 0))
