"""Model test of the real driver, in one process: the coordinator's loop, its lease,
its proposals and its participant calls, with everything around it in memory.

The Saga Log is the real one (on a MemoryKV) behind a Raft that commits, delays or
loses each proposal when the test says; participants are real SDK participants
(`cluster.participant`, on SQLite) behind a network that delivers, duplicates or
loses each call, before or after the participant acted, and answers late. The
clock is the test's: it jumps (retry timers fire, proposals expire, a jump longer
than the lease is a pause and needs a barrier). Leaders fail over (a new driver, a
new epoch, nothing kept in memory; the old one's calls and proposals may still land)
and users abort. At the end the faults stop, the sagas are driven to their end, and
the saga guarantee is checked against what the participants did.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pysyncobj import FAIL_REASON
from saga.v1 import log_pb2, participant_pb2

from cluster.participant import Participant, Refused, Step
from coordinator import core
from coordinator.calls import AnswerFn, unreachable
from coordinator.driver import Driver
from coordinator.view import SagaView
from sagalog import codec
from sagalog import records as rec
from sagalog.kv import MemoryKV
from sagalog.log import SagaLog
from sagalog.transitions import Phase

SAGAS = ("a", "b")
ENDPOINT = "p:1"
LEASE_S = 0.2


class ModelRaft:
    """The real Saga Log; proposals wait until the test commits or loses them."""

    def __init__(self) -> None:
        self.log = SagaLog(MemoryKV())
        self.index = 0
        self.pending: list[tuple[bytes, Any]] = []

    def apply_batch(self, batch: bytes, callback: Any) -> None:
        self.pending.append((batch, callback))

    @contextmanager
    def reading(self) -> Iterator[SagaLog]:
        yield self.log

    def majority_heard_within(self, seconds: float) -> bool:
        return True

    def commit_now(self, records: list[log_pb2.Record]) -> log_pb2.BatchResult:
        """What another writer (Submit, Abort, a new leader's Epoch) commits."""
        return self._apply(codec.encode_batch(records))

    def commit(self, i: int) -> None:
        batch, callback = self.pending.pop(i)
        result = self._apply(batch)
        callback(result.SerializeToString(), FAIL_REASON.SUCCESS)

    def _apply(self, batch: bytes) -> log_pb2.BatchResult:
        self.index += 1
        result = log_pb2.BatchResult()
        result.ParseFromString(self.log.apply_batch(batch, self.index))
        assert not result.error, result.error
        for r in result.results:  # a driver never proposes a malformed record
            assert r.code != log_pb2.REJECT_INVALID, r.reason
        return result


@dataclass
class InFlight:
    endpoint: str
    request: participant_pb2.StepRequest
    compensation: bool
    answer: AnswerFn


class ModelNetwork:
    """The participant transport: every call waits in `calls` until delivered."""

    def __init__(self) -> None:
        self.calls: list[InFlight] = []

    def send(
        self,
        endpoint: str,
        request: participant_pb2.StepRequest,
        compensation: bool,
        timeout_s: float,
        answer: AnswerFn,
    ) -> None:
        copy = participant_pb2.StepRequest()
        copy.CopyFrom(request)
        self.calls.append(InFlight(endpoint, copy, compensation, answer))

    def close(self) -> None:
        pass  # calls already sent may still arrive: they stay in `calls`


SCHEMA = "CREATE TABLE IF NOT EXISTS effects (request_key TEXT NOT NULL, state TEXT NOT NULL)"


class DriverModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.TemporaryDirectory(dir=base)
        self.db_path = os.path.join(self.dir.name, "p.sqlite")
        self.accept = True
        self.participant = self._participant()
        self.raft = ModelRaft()
        self.network = ModelNetwork()
        self.clock = 1000.0
        self.epoch = 0
        self.driver: Driver | None = None
        self.fail_over()
        for saga_id in SAGAS:
            start = rec.start_saga(saga_id, self.epoch, definition())
            opening = core.plan_ahead(SagaView(saga_id), [start], self.epoch, 0)  # as Submit
            self.raft.commit_now([start, *opening.records])

    def _participant(self) -> Participant:
        p = Participant("P", self.db_path, schema=SCHEMA)

        @p.request()
        def book(step: Step) -> bytes:
            if not self.accept:
                raise Refused("no")
            step.db.execute("INSERT INTO effects VALUES (?, 'in_effect')", (step.request_key,))
            return b"booked"

        @p.compensation()
        def cancel(step: Step, booked: bytes | None) -> None:
            step.db.execute(
                "UPDATE effects SET state = 'cancelled' WHERE request_key = ?",
                (step.request_key,),
            )

        return p

    def teardown(self) -> None:
        try:
            self.finish()
        finally:
            self.participant.close()
            self.dir.cleanup()

    # ---- plumbing ------------------------------------------------------------------------

    def monotonic(self) -> float:
        return self.clock

    def view(self, saga_id: str) -> SagaView:
        return SagaView.from_records(saga_id, self.raft.log.records(saga_id))

    def reply_of(self, call: InFlight) -> core.Reply:
        kind = "compensate" if call.compensation else "execute"
        outcome = self.participant.handle(kind, call.request)
        if outcome.reply is None:  # stale epoch, handler error: a transport failure
            return core.Reply(None, error=unreachable(call.request.vertex, "FAILED_PRECONDITION"))
        r = outcome.reply
        return core.Reply(r.ok, r.output, r.error)

    # ---- rules ---------------------------------------------------------------------------

    @rule()
    def turn(self) -> None:
        assert self.driver is not None
        self.driver.step()

    @precondition(lambda self: self.raft.pending)
    @rule(data=st.data(), lose=st.booleans())
    def commit_or_lose_a_proposal(self, data: Any, lose: bool) -> None:
        i = data.draw(st.integers(0, len(self.raft.pending) - 1))
        if lose:
            self.raft.pending.pop(i)  # its callback never comes: it expires
        else:
            self.raft.commit(i)

    @precondition(lambda self: self.network.calls)
    @rule(
        data=st.data(),
        accept=st.booleans(),
        fate=st.sampled_from(["reply", "lost_before", "lost_after", "duplicate"]),
    )
    def deliver(self, data: Any, accept: bool, fate: str) -> None:
        i = data.draw(st.integers(0, len(self.network.calls) - 1))
        call = self.network.calls[i] if fate == "duplicate" else self.network.calls.pop(i)
        self.accept = accept
        if fate == "lost_before":
            reply = core.Reply(None, error=unreachable(call.request.vertex, "UNAVAILABLE"))
        else:
            reply = self.reply_of(call)
            if fate == "lost_after":
                reply = core.Reply(None, error=unreachable(call.request.vertex, "DEADLINE"))
        call.answer(reply)

    @rule(seconds=st.sampled_from([0.05, 0.3, 1.0, 4.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock += seconds  # timers fire; past the lease it is a pause

    @rule()
    def fail_over(self) -> None:
        """A new leader: a new epoch, a new driver; nothing in memory survives."""
        if self.driver is not None:
            self.driver.stop()
        self.epoch += 1
        self.raft.commit_now([rec.epoch(self.epoch, f"n{self.epoch}")])
        self.driver = Driver(
            self.raft,
            self.epoch,
            f"n{self.epoch}",
            now_ms=lambda: int(self.clock * 1000),
            lease_s=LEASE_S,
            participants=self.network,
            monotonic=self.monotonic,
            turn_wait_s=0.0,
        )
        self.raft.log.listener = self.driver.on_applied

    @rule(saga_id=st.sampled_from(SAGAS))
    def user_abort(self, saga_id: str) -> None:
        if self.view(saga_id).phase is Phase.RUNNING:
            self.raft.commit_now([rec.abort_saga(saga_id, self.epoch, "user")])

    @invariant()
    def no_request_took_effect_twice(self) -> None:
        with sqlite3.connect(self.db_path) as db:
            keys = [k for (k,) in db.execute("SELECT request_key FROM effects")]
        assert len(keys) == len(set(keys)), keys

    # ---- the end: no more faults -----------------------------------------------------------

    def finish(self) -> None:
        self.accept = True
        for _ in range(400):
            if all(self.view(s).phase is Phase.ENDED for s in SAGAS):
                break
            self.turn()
            while self.raft.pending:
                self.raft.commit(0)
            while self.network.calls:
                call = self.network.calls.pop(0)
                call.answer(self.reply_of(call))
            self.turn()
            self.clock += 0.1  # retries come due; never a pause
        with sqlite3.connect(self.db_path) as db:
            effects = dict(db.execute("SELECT request_key, state FROM effects").fetchall())
        for saga_id in SAGAS:
            view = self.view(saga_id)
            assert view.phase is Phase.ENDED, (saga_id, view.state)
            keys = [core.request_key(saga_id, v) for v in view.vertices]
            states = [effects.get(k) for k in keys]
            if view.outcome == log_pb2.OUTCOME_COMPLETED:
                assert states == ["in_effect"] * len(keys), (saga_id, states)
            else:
                assert "in_effect" not in states, (saga_id, states)


def definition() -> log_pb2.SagaDefinition:
    return rec.travel_shaped_definition(endpoint=ENDPOINT, max_attempts=3)


DriverModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("DRIVER_MODEL_EXAMPLES", "150")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDriverModel = DriverModel.TestCase
