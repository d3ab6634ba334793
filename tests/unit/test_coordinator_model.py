"""Model test: the coordinator's core and the real Saga Log against model participants.

Hypothesis interleaves: planning, deliveries of participant calls in any order,
business refusals, lost replies (before or after the participant acted),
duplicated deliveries, retries, and coordinator crashes followed by a new leader
(a new epoch, nothing kept in memory; calls already sent may still arrive late).
At the end the faults stop, the sagas are driven to their end, and the saga
guarantee is checked against what the participants actually did.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from saga.v1 import log_pb2

from coordinator import core
from coordinator.view import SagaView
from sagalog import codec
from sagalog import records as rec
from sagalog.kv import MemoryKV
from sagalog.log import SagaLog
from sagalog.transitions import Phase

SAGAS = ["a", "b"]


def definition() -> log_pb2.SagaDefinition:
    return rec.travel_shaped_definition(endpoint="p:1", max_attempts=3)


class Participants:
    """Idempotent requests, commutative compensations with tombstones: the contract."""

    def __init__(self) -> None:
        self.effects: dict[str, str] = {}  # request key -> in_effect | refused | cancelled
        self.tombstones: set[str] = set()
        self.times_effected: dict[str, int] = {}

    def execute(self, key: str, accept: bool) -> core.Reply:
        if key in self.tombstones:
            return core.Reply(False, error="cancelled before it arrived")
        if key not in self.effects:
            self.effects[key] = "in_effect" if accept else "refused"
            if accept:
                self.times_effected[key] = self.times_effected.get(key, 0) + 1
        ok = self.effects[key] != "refused"
        return core.Reply(ok, b"out" if ok else b"", "" if ok else "refused")

    def compensate(self, request_key: str) -> core.Reply:
        state = self.effects.get(request_key)
        if state == "in_effect":
            self.effects[request_key] = "cancelled"
        elif state is None:
            self.tombstones.add(request_key)
        return core.Reply(True)


@dataclass
class Message:
    saga_id: str
    call: core.Call
    epoch: int  # the driver incarnation that sent it


class CoordinatorModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.log = SagaLog(MemoryKV())
        self.index = 0
        self.epoch = 0
        self.parts = Participants()
        self.network: list[Message] = []
        self.retries: list[tuple[str, core.Call]] = []
        self.outstanding: set[tuple[str, core.Call]] = set()
        self.new_leader()
        for saga_id in SAGAS:
            start = rec.start_saga(saga_id, self.epoch, definition())
            # As Submit does: the roots' StartT in the StartSaga's entry.
            opening = core.plan_ahead(SagaView(saga_id), [start], self.epoch, 0)
            assert opening.records and not opening.calls
            self.commit([start, *opening.records])

    # ---- plumbing --------------------------------------------------------------------

    def commit(self, records: list[log_pb2.Record]) -> None:
        self.index += 1
        raw = self.log.apply_batch(codec.encode_batch(records), self.index)
        result = log_pb2.BatchResult()
        result.ParseFromString(raw)
        for r, res in zip(records, result.results, strict=True):
            # The core only ever proposes what the log accepts (or already has).
            assert res.verdict != log_pb2.REJECTED, (r, res.reason)

    def view(self, saga_id: str) -> SagaView:
        return SagaView.from_records(saga_id, self.log.records(saga_id))

    def key(self, saga_id: str, call: core.Call) -> str:
        return core.request_key(saga_id, call.vertex)

    def handle(self, saga_id: str, call: core.Call, reply: core.Reply) -> None:
        view = self.view(saga_id)
        response = core.on_reply(view, call, reply, self.epoch, 0)
        if response.records:
            # As the driver does: what follows the reply's records goes in their entry.
            following = core.plan_ahead(view, response.records, self.epoch, 0)
            self.commit(response.records + following.records)
        if response.retry_after_ms is not None:
            self.retries.append((saga_id, call))

    def deliver_to_participant(self, msg: Message, accept: bool) -> core.Reply:
        key = self.key(msg.saga_id, msg.call)
        if msg.call.compensation:
            return self.parts.compensate(key)
        return self.parts.execute(key, accept)

    # ---- rules -----------------------------------------------------------------------

    @rule(saga_id=st.sampled_from(SAGAS))
    def plan(self, saga_id: str) -> None:
        plan = core.plan_ahead(self.view(saga_id), [], self.epoch, 0)
        if plan.records:
            self.commit(plan.records)
        for call in plan.calls:
            if (saga_id, call) not in self.outstanding:
                self.outstanding.add((saga_id, call))
                self.network.append(Message(saga_id, call, self.epoch))

    @precondition(lambda self: self.network)
    @rule(
        data=st.data(),
        accept=st.booleans(),
        fate=st.sampled_from(["reply", "lost_before", "lost_after", "duplicate"]),
    )
    def deliver(self, data, accept: bool, fate: str) -> None:
        i = data.draw(st.integers(0, len(self.network) - 1))
        msg = self.network[i] if fate == "duplicate" else self.network.pop(i)
        current = msg.epoch == self.epoch
        if fate == "lost_before":
            reply = core.Reply(None, error="UNAVAILABLE")
        else:
            reply = self.deliver_to_participant(msg, accept)
            if fate == "lost_after":
                reply = core.Reply(None, error="DEADLINE_EXCEEDED")
        if current:
            if fate != "duplicate":
                self.outstanding.discard((msg.saga_id, msg.call))
            self.handle(msg.saga_id, msg.call, reply)

    @precondition(lambda self: self.retries)
    @rule(data=st.data())
    def fire_retry(self, data) -> None:
        saga_id, call = self.retries.pop(data.draw(st.integers(0, len(self.retries) - 1)))
        records = core.retry(self.view(saga_id), call, self.epoch, 0)
        if records:
            self.commit(records)
        elif records == []:
            self.network.append(Message(saga_id, call, self.epoch))

    @rule()
    def crash_and_fail_over(self) -> None:
        """The leader dies: nothing in memory survives; sent calls may still land."""
        self.new_leader()

    def new_leader(self) -> None:
        self.epoch += 1
        self.commit([rec.epoch(self.epoch, f"n{self.epoch}")])
        self.outstanding.clear()
        self.retries.clear()

    @rule(saga_id=st.sampled_from(SAGAS))
    def user_abort(self, saga_id: str) -> None:
        if self.view(saga_id).phase is Phase.RUNNING:
            self.commit([rec.abort_saga(saga_id, self.epoch, "user")])

    @invariant()
    def no_request_took_effect_twice(self) -> None:
        assert all(n == 1 for n in self.parts.times_effected.values())

    # ---- the end: no more faults -----------------------------------------------------

    def teardown(self) -> None:
        self.new_leader()
        for _ in range(300):
            if all(self.view(s).phase is Phase.ENDED for s in SAGAS):
                break
            for saga_id in SAGAS:
                self.plan(saga_id)
            while self.retries:
                saga_id, call = self.retries.pop()
                records = core.retry(self.view(saga_id), call, self.epoch, 0)
                if records:
                    self.commit(records)
                elif records == []:
                    self.network.append(Message(saga_id, call, self.epoch))
            while self.network:
                msg = self.network.pop(0)
                reply = self.deliver_to_participant(msg, accept=True)
                if msg.epoch == self.epoch:
                    self.outstanding.discard((msg.saga_id, msg.call))
                    self.handle(msg.saga_id, msg.call, reply)
        for saga_id in SAGAS:
            view = self.view(saga_id)
            assert view.phase is Phase.ENDED, (saga_id, view.state)
            keys = [core.request_key(saga_id, v) for v in view.vertices]
            effects = [self.parts.effects.get(k) for k in keys]
            if view.outcome == log_pb2.OUTCOME_COMPLETED:
                assert effects == ["in_effect"] * len(keys), (saga_id, effects)
            else:
                assert "in_effect" not in effects, (saga_id, effects)


CoordinatorModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
TestCoordinatorModel = CoordinatorModel.TestCase
